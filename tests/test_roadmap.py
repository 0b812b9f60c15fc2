"""The ResNet-50 to ConvNeXt-T roadmap network (--model resnet and the --resnet_* flags)."""
import json

import pytest
import timm
import torch
import torchvision

import main
from conftest import ROOT, train_argv
from models import resnet_roadmap
from models.resnet_roadmap import ROADMAP_STEPS, ResNetRoadmap, convnext_state_dict, torchvision_state_dict
from utils import DataError


def step_args(k, **extra):
    """main.py flags of roadmap step k (0: ResNet-50, len(ROADMAP_STEPS): ConvNeXt-T) as an argparse.Namespace."""
    argv = ['--model', 'resnet']
    for _, flag, value in ROADMAP_STEPS[:k]:
        argv += [f'--{flag}', str(value)]
    for flag, value in extra.items():
        argv += [f'--{flag}', str(value)]
    return main.get_args_parser().parse_args(argv)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_defaults_are_torchvision_resnet50():
    model = ResNetRoadmap(**resnet_roadmap.options_from_args(step_args(0))).eval()
    assert n_params(model) == 25_557_032
    reference = torchvision.models.resnet50().eval()
    for m in reference.modules():  # non-trivial BatchNorm statistics so that a wrong wiring shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    model.load_state_dict(torchvision_state_dict(reference.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_every_step_is_convnext_tiny():
    model = timm.create_model('resnet', **resnet_roadmap.options_from_args(step_args(len(ROADMAP_STEPS)))).eval()
    reference = timm.create_model('convnext_tiny').eval()
    assert n_params(model) == n_params(reference) == 28_589_128
    for p in reference.parameters():  # layer scale at 1e-6 would hide the blocks: give them weight
        if p.ndim == 1 and p.shape[0] in (96, 192, 384, 768):
            p.data.uniform_(0.5, 1.5)
    model.load_state_dict(convnext_state_dict(reference.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_each_intermediate_step_builds_and_trains():
    counts = []
    for k in range(len(ROADMAP_STEPS) + 1):
        model = ResNetRoadmap(num_classes=2, **resnet_roadmap.options_from_args(step_args(k)))
        counts.append(n_params(model))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        before = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), ROADMAP_STEPS[k - 1][0] if k else 'ResNet-50'
        changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed >= len(before) // 2, (k, changed, len(before))
    assert len(set(counts)) >= 10  # the steps change the network, not only the flags


@pytest.mark.parametrize('flag,value,match', [
    ('resnet_layers', '3-3-9', '4 block counts'),
    ('resnet_layers', 'a-b-c-d', 'four block counts'),
    ('resnet_kernel_size', '4', 'odd'),
    ('resnet_embed_dim', '6', 'multiple of 4'),
])
def test_bad_roadmap_flags_are_one_line(flag, value, match):
    with pytest.raises(DataError, match=match):
        main.check_args(step_args(0, **{flag: value}))


def test_main_trains_a_roadmap_step(elpv_small, tmp_path):
    out = tmp_path / 'run'
    main.main(train_argv(elpv_small, out, '--epochs', '1', '--model', 'resnet', '--resnet_layers', '1-1-1-1',
                         '--resnet_embed_dim', '8', '--resnet_stem', 'patch_embed', '--resnet_block', 'inverted',
                         '--resnet_norm_layer', 'ln', '--use_amp', 'False', '--channels_last', 'False'))
    finished = json.loads((out / 'finished.json').read_text())
    assert finished['epochs_run'] == 1
    saved = json.loads((out / 'args.json').read_text())
    assert saved['resnet_block'] == 'inverted' and saved['resnet_embed_dim'] == 8
    result = main.main(['--eval', 'True', '--resume', str(out / 'checkpoint-best.pth'),
                        '--eval_data_path', str(elpv_small), '--num_workers', '0'])
    assert result is not None


def test_modernize_sweep_runs_each_step_once():
    import run
    sweep = run.load_sweep(run.get_args_parser().parse_args(['--config', str(ROOT / 'configs' / 'modernize.yaml')]))
    runs = run.plan_runs(sweep)
    assert len(runs) == len(ROADMAP_STEPS) + 1
    for k, r in enumerate(runs):
        assert r['name'].startswith(f'step{k:02d}_')
        flags = main.get_args_parser().parse_args([t for f, toks in r['flags'].items() for t in (f'--{f}', *toks)])
        assert resnet_roadmap.options_from_args(flags) == resnet_roadmap.options_from_args(step_args(k)), r['name']
