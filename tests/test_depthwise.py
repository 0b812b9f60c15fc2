"""--depthwise_fp32: the depthwise convolutions in fp32 channels_last inside bf16 autocast (models.depthwise)."""
import json

import pytest
import timm
import torch
from torch import nn

import main as cli
from conftest import train_argv
from engine import DeviceSettings
from models.depthwise import DepthwiseConv2dFP32, set_depthwise_fp32
from models.fcmae import FCMAE


def test_swap_changes_the_class_only():
    torch.manual_seed(0)
    model = timm.create_model('convnext_atto', num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_depthwise_fp32(model, True) == 12  # one per block: depths 2, 2, 6, 2
    assert type(model.stages[2].blocks[0].conv_dw) is DepthwiseConv2dFP32
    assert type(model.stem[0]) is nn.Conv2d and type(model.stages[1].downsample[1]) is nn.Conv2d  # not depthwise
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert set_depthwise_fp32(model, False) == 12
    assert not any(isinstance(m, DepthwiseConv2dFP32) for m in model.modules())


def test_fp32_depthwise_under_autocast_is_closer_to_fp32():
    torch.manual_seed(0)
    model, x = timm.create_model('convnext_atto', num_classes=2).eval(), torch.randn(2, 3, 64, 64)
    conv = model.stages[0].blocks[0].conv_dw
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            plain = model(x).float()
            set_depthwise_fp32(model, True)
            mixed = model(x).float()
            out = conv(torch.randn(2, 40, 16, 16, dtype=torch.bfloat16))
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        set_depthwise_fp32(model, False)
        assert torch.equal(model(x), reference)  # back to the plain class, the same function
    assert (mixed - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 elsewhere: close, not equal
    assert (mixed - reference).abs().mean() <= (plain - reference).abs().mean()


def test_gradients_match_fp32_without_autocast():
    torch.manual_seed(0)
    model, x = timm.create_model('convnext_atto', num_classes=2), torch.randn(2, 3, 64, 64, requires_grad=True)
    grads = []
    for enabled in (False, True):
        set_depthwise_fp32(model, enabled)
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).logsumexp(-1).sum().backward()
        grads.append((model.stages[1].blocks[0].conv_dw.weight.grad.clone(), x.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_device_settings_prepare_swaps_only_with_autocast():
    model = timm.create_model('convnext_atto', num_classes=2)
    DeviceSettings(torch.device('cpu'), False, 'bfloat16', False, True).prepare(model)  # fp32: nothing to keep out
    assert not any(isinstance(m, DepthwiseConv2dFP32) for m in model.modules())
    DeviceSettings(torch.device('cpu'), True, 'bfloat16', False, True).prepare(model)
    assert sum(isinstance(m, DepthwiseConv2dFP32) for m in model.modules()) == 12
    DeviceSettings(torch.device('cpu'), True, 'bfloat16', True, False).prepare(model)
    assert not any(isinstance(m, DepthwiseConv2dFP32) for m in model.modules())
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_fcmae_masking_hooks_still_apply():
    torch.manual_seed(0)
    model = FCMAE('convnextv2_atto', decoder_embed_dim=32).train()
    x = torch.randn(2, 3, 64, 64)
    losses = []
    for enabled in (False, True):
        set_depthwise_fp32(model, enabled)
        torch.manual_seed(1)  # the same mask
        losses.append(model(x)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_training_with_fp32_depthwise_gives_a_plain_checkpoint(elpv_small, tmp_path):
    out, mixed = tmp_path / 'out', ['--use_amp', 'True', '--channels_last', 'False', '--depthwise_fp32', 'True']
    summary = cli.main(train_argv(elpv_small, out, '--epochs', '1', '--compile', 'False', *mixed))
    saved = json.loads((out / 'args.json').read_text())
    assert saved['depthwise_fp32'] is True and saved['use_amp'] is True
    ckpt = torch.load(out / 'checkpoint-best.pth', weights_only=True)
    model = timm.create_model('convnext_atto', num_classes=2)
    model.load_state_dict(ckpt['model'])  # the same keys as a model without the swap
    argv = ['--eval', 'True', '--resume', str(out / 'checkpoint-best.pth'), '--eval_data_path', str(elpv_small),
            '--num_workers', '0']
    metrics = cli.main(argv + ['--output_dir', str(tmp_path / 'eval'), *mixed])
    assert metrics['brier'] == pytest.approx(summary['test']['brier'], abs=1e-6)  # evaluated as it was trained
    fp32 = cli.main(argv + ['--output_dir', str(tmp_path / 'fp32'), '--use_amp', 'False', '--channels_last', 'False'])
    assert fp32['brier'] == pytest.approx(metrics['brier'], abs=0.02)  # the same weights in fp32 throughout


def test_depthwise_fp32_needs_autocast(elpv_small, tmp_path):
    from utils import DataError
    with pytest.raises(DataError, match='--depthwise_fp32 True'):
        cli.main(train_argv(elpv_small, tmp_path / 'out', '--use_amp', 'False', '--depthwise_fp32', 'True'))
    assert not (tmp_path / 'out' / 'checkpoint-last.pth').exists()
