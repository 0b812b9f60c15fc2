import json
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt

from conftest import REFERENCE
from models import ConvNeXtIsotropic, build_model, load_pretrained
from utils import DataError

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason='shared/reference not beside the project')


def reference(name):
    x = torch.load(REFERENCE / 'reference_input_2x3x64x64.pt', weights_only=True)
    logits = torch.tensor(json.loads((REFERENCE / 'reference_logits.json').read_text())[name]['logits'])
    return x, logits


@needs_reference
@pytest.mark.parametrize('name,make', [
    ('official_convnext_v1_d1121_w16.pth',
     lambda: ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=5, ls_init_value=1e-6)),
    ('official_convnext_v1_d1121_w16.pth',  # timm's conv-MLP layout takes the official Linear weights too
     lambda: ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=5, ls_init_value=1e-6, conv_mlp=True)),
    ('official_convnextv2_d1121_w16.pt',
     lambda: ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=5, use_grn=True, ls_init_value=None)),
    ('official_convnext_isotropic_d2_w64.pth',
     lambda: ConvNeXtIsotropic(depth=2, dim=64, num_classes=5, ls_init_value=1e-6)),
])
def test_official_checkpoints_reproduce_logits(name, make):
    model = make().eval()
    report = load_pretrained(model, REFERENCE / name)
    assert report['missing'] == [] and report['unexpected'] == []
    x, expected = reference(name)
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() < 1e-4


def model_args(**kw):
    base = dict(model='convnext_atto', nb_classes=2, drop_path=0.0, in_chans=3, head_init_scale=1.0,
                layer_scale_init_value=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize('name', ['convnext_atto', 'convnext_tiny', 'convnextv2_atto', 'convnextv2_huge',
                                  'convnext_xlarge', 'convnext_isotropic_small'])
def test_every_family_builds(name):
    with torch.device('meta'):  # no memory for the big ones
        model = build_model(model_args(model=name, nb_classes=4, drop_path=0.2))
    assert model.num_classes == 4


def test_unknown_model_name():
    with pytest.raises(DataError, match='unknown model name'):
        build_model(model_args(model='convnext_tinyy'))


def test_finetune_timm_checkpoint_other_head(tmp_path):
    src = build_model(model_args(nb_classes=4))
    torch.save({'model': src.state_dict(), 'epoch': 3}, tmp_path / 'ck.pth')
    dst = build_model(model_args(nb_classes=2))
    report = load_pretrained(dst, tmp_path / 'ck.pth')
    assert sorted(report['dropped_head']) == ['head.fc.bias', 'head.fc.weight']
    assert report['missing'] == ['head.fc.weight', 'head.fc.bias']
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    assert torch.equal(dst.stages[3].blocks[1].mlp.fc2.weight, src.stages[3].blocks[1].mlp.fc2.weight)


def test_finetune_ema_key_module_prefix_safetensors_and_one_channel(tmp_path):
    from safetensors.torch import save_file
    src = build_model(model_args())
    ema = {f'module.{k}': v + 1 for k, v in src.state_dict().items()}
    torch.save({'model': src.state_dict(), 'model_ema': ema}, tmp_path / 'ck.pth')
    dst = build_model(model_args())
    load_pretrained(dst, tmp_path / 'ck.pth', model_key='model_ema')
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight + 1)

    save_file(src.state_dict(), tmp_path / 'w.safetensors')
    gray = build_model(model_args(in_chans=1))
    load_pretrained(gray, tmp_path / 'w.safetensors')
    assert gray.stem[0].weight.shape[1] == 1
    assert torch.allclose(gray.stem[0].weight[:, 0], src.stem[0].weight.sum(1), atol=1e-6)


def test_checkpoint_of_another_architecture(tmp_path):
    torch.save({'model': timm.create_model('convnext_femto').state_dict()}, tmp_path / 'femto.pth')
    with pytest.raises(DataError, match='femto.pth: checkpoint does not fit'):
        load_pretrained(build_model(model_args()), tmp_path / 'femto.pth')
    torch.save({'model': timm.create_model('resnet10t').state_dict()}, tmp_path / 'resnet.pth')
    with pytest.raises(DataError, match='resnet.pth'):
        load_pretrained(build_model(model_args()), tmp_path / 'resnet.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(DataError, match='junk.pth: unreadable checkpoint'):
        load_pretrained(build_model(model_args()), tmp_path / 'junk.pth')


def test_batchnorm_convnext():
    model = build_model(model_args(model='convnextv2_atto', norm_layer='batchnorm'))
    kinds = {type(m).__name__ for m in model.stages.modules()}
    assert 'BatchNorm2d' in kinds and not kinds & {'LayerNorm', 'LayerNorm2d'}
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    with pytest.raises(DataError, match='--norm_layer batchnorm: only timm ConvNeXt V1/V2'):
        build_model(model_args(model='convnext_isotropic_small', norm_layer='batchnorm'))


@pytest.mark.parametrize('pool', ['max', 'avgmax'])
def test_global_pool_of_the_head(pool):
    torch.manual_seed(0)
    model = build_model(model_args(model='convnext_atto', norm_layer='batchnorm', global_pool=pool)).eval()
    feats = model.forward_features(torch.randn(2, 3, 64, 64))  # [2, 320, 2, 2]
    pooled = model.head.global_pool(feats).flatten(1)
    peak, mean = feats.amax(dim=(2, 3)), feats.mean(dim=(2, 3))
    assert torch.allclose(pooled, peak if pool == 'max' else (peak + mean) / 2, atol=1e-6)
    assert not torch.allclose(pooled, mean, atol=1e-3)
    old = model_args()  # run arguments saved before --global_pool existed pool by average
    assert not hasattr(old, 'global_pool') and build_model(old).head.global_pool.pool_type == 'avg'
    with pytest.raises(DataError, match=f'--global_pool {pool}: only timm ConvNeXt V1/V2'):
        build_model(model_args(model='convnext_isotropic_small', global_pool=pool))


def test_weight_decay_spares_grn_norms_biases_and_layer_decay_scales_lr():
    """V2 fine-tuning as its authors advise: GRN's gamma/beta, norms and biases get no weight decay (timm groups every
    1-D parameter apart), and --layer_decay gives the stem a smaller learning rate than the head."""
    from engine import build_optimizer
    from main import get_args_parser
    args = get_args_parser().parse_args(['--weight_decay', '0.05', '--layer_decay', '0.8', '--lr', '1e-3',
                                         '--epochs', '2', '--warmup_epochs', '0'])
    model = build_model(model_args(model='convnextv2_atto'))
    optimizer, scheduler = build_optimizer(model, args, updates_per_epoch=4)
    scheduler.step_update(num_updates=1)
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    names = dict(model.named_parameters())
    grn = [n for n in names if '.grn.' in n]
    assert len(grn) == 2 * sum(len(s.blocks) for s in model.stages)  # gamma and beta of every block
    for name, p in names.items():
        assert group_of[id(p)]['weight_decay'] == (0.0 if p.ndim <= 1 else 0.05), name
    stem, head = group_of[id(names['stem.0.weight'])]['lr'], group_of[id(names['head.fc.weight'])]['lr']
    assert 0 < stem < 0.5 * head


@pytest.mark.parametrize('opt, fused', [('adamw', True), ('sgd', True), ('lamb', None)])
def test_fused_optimizer_step_where_torch_has_one(opt, fused):
    """--opt_fused True (default) takes torch's fused AdamW/SGD step, which updates like the per-tensor loop of
    --opt_fused False; optimizers without one (timm's Lamb) keep their own step."""
    from engine import build_optimizer
    from main import get_args_parser
    results = {}
    for flag in ('True', 'False'):
        torch.manual_seed(0)
        model = build_model(model_args(model='convnext_atto'))
        args = get_args_parser().parse_args(['--opt', opt, '--opt_fused', flag, '--warmup_epochs', '0'])
        optimizer, _ = build_optimizer(model, args, updates_per_epoch=4)
        assert optimizer.defaults.get('fused') == (fused if flag == 'True' else None)
        x = torch.randn(2, 3, 32, 32)
        for _ in range(3):
            model(x).logsumexp(1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[flag] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(results['True'], results['False'], rtol=1e-4, atol=1e-6)
