"""--depthwise_fp32 (the depthwise convolutions in fp32 channels_last inside bf16 autocast) and --depthwise_wgrad
(their weight gradient by the forward kernel on the CPU): models.depthwise."""
import json

import pytest
import timm
import torch
from torch import nn

import main as cli
from conftest import train_argv
from engine import DeviceSettings
import precision
from models.depthwise import DepthwiseConv2d, DepthwiseConv2dFP32, DepthwiseConvFunction, set_depthwise
from utils import DataError
from models.fcmae import FCMAE


def test_swap_changes_the_class_only():
    torch.manual_seed(0)
    model = timm.create_model('convnext_atto', num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_depthwise(model, fp32=True) == 12  # one per block: depths 2, 2, 6, 2
    assert type(model.stages[2].blocks[0].conv_dw) is DepthwiseConv2dFP32
    assert type(model.stem[0]) is nn.Conv2d and type(model.stages[1].downsample[1]) is nn.Conv2d  # not depthwise
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert set_depthwise(model, fp32=False) == 12
    assert not any(isinstance(m, DepthwiseConv2dFP32) for m in model.modules())


def test_fp32_depthwise_under_autocast_is_closer_to_fp32():
    torch.manual_seed(0)
    model, x = timm.create_model('convnext_atto', num_classes=2).eval(), torch.randn(2, 3, 64, 64)
    conv = model.stages[0].blocks[0].conv_dw
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            plain = model(x).float()
            set_depthwise(model, fp32=True)
            mixed = model(x).float()
            out = conv(torch.randn(2, 40, 16, 16, dtype=torch.bfloat16))
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        set_depthwise(model, fp32=False)
        assert torch.equal(model(x), reference)  # back to the plain class, the same function
    assert (mixed - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 elsewhere: close, not equal
    assert (mixed - reference).abs().mean() <= (plain - reference).abs().mean()


def test_gradients_match_fp32_without_autocast():
    torch.manual_seed(0)
    model, x = timm.create_model('convnext_atto', num_classes=2), torch.randn(2, 3, 64, 64, requires_grad=True)
    grads = []
    for enabled in (False, True):
        set_depthwise(model, fp32=enabled)
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
    losses, grads = [], []
    for fp32, wgrad in ((False, False), (True, False), (False, True)):
        set_depthwise(model, fp32=fp32, forward_conv_wgrad=wgrad)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same mask
        losses.append(model(x)[0])
        losses[-1].backward()
        grads.append(model.encoder.encoder.stages[1].blocks[0].conv_dw.weight.grad)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and torch.allclose(losses[0], losses[2], rtol=1e-5)
    assert torch.allclose(grads[0], grads[2], rtol=1e-4, atol=1e-6)


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
    with pytest.raises(DataError, match='--depthwise_fp32 True'):
        cli.main(train_argv(elpv_small, tmp_path / 'out', '--use_amp', 'False', '--depthwise_fp32', 'True'))
    assert not (tmp_path / 'out' / 'checkpoint-last.pth').exists()


def test_forward_conv_weight_gradient_is_the_convolution_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64, requires_grad=True)  # odd sizes, a rectangular kernel
    weight = torch.randn(5, 1, 7, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: DepthwiseConvFunction.apply(*t, (3, 2)), (x, weight, bias))
    out = DepthwiseConvFunction.apply(x, weight, None, (3, 2))  # no bias: one gradient fewer, the same others
    assert out.shape == (3, 5, 9, 11)
    grads = torch.autograd.grad(out.square().sum(), (x, weight))
    reference = nn.functional.conv2d(x, weight, padding=(3, 2), groups=5)
    expected = torch.autograd.grad(reference.square().sum(), (x, weight))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, expected))


def model_gradients(model, x, autocast, backward_inside=True):
    """The gradients of every parameter of ``model`` after one backward pass of ``x`` (optionally under autocast)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        loss = model(x).logsumexp(-1).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('fp32', [False, True])
def test_forward_conv_weight_gradient_trains_the_same_model(fp32):
    torch.manual_seed(0)
    model = timm.create_model('convnextv2_atto', num_classes=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    set_depthwise(model, fp32=fp32)
    native = model_gradients(model, x, autocast=fp32)
    assert set_depthwise(model, fp32=fp32, forward_conv_wgrad=True) == 12
    conv = model.stages[2].blocks[0].conv_dw
    assert type(conv) is (DepthwiseConv2dFP32 if fp32 else DepthwiseConv2d)
    assert type(conv(torch.randn(1, 160, 8, 8)).grad_fn).__name__ == 'DepthwiseConvFunctionBackward'
    # fp32 depthwise convolutions inside bf16 autocast: their weight gradient stays fp32 even when backward() runs
    # inside the autocast block, as it does here
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(native, model_gradients(model, x, fp32)))
    assert set_depthwise(model, fp32=fp32) == 12 and not getattr(conv, 'forward_conv_wgrad', False)


def test_forward_conv_weight_gradient_in_bf16_is_close():
    torch.manual_seed(0)
    model, x = timm.create_model('convnextv2_atto', num_classes=2), torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        set_depthwise(model, fp32=False)
    reference = model_gradients(model.double(), x.double(), autocast=False)
    model.float()
    errors = []
    for wgrad in (False, True):
        set_depthwise(model, forward_conv_wgrad=wgrad)
        grads = model_gradients(model, x, autocast=True, backward_inside=False)
        dw = [i for i, (name, _) in enumerate(model.named_parameters()) if name.endswith('conv_dw.weight')]
        errors.append(max(((grads[i].double() - reference[i]).norm() / reference[i].norm()).item() for i in dw))
    assert errors[1] < 0.05 and errors[1] < 3 * errors[0]  # bf16 rounding either way, of the same order


def test_forward_conv_weight_gradient_only_where_it_applies():
    torch.manual_seed(0)
    model = timm.create_model('convnext_atto', num_classes=2)
    set_depthwise(model, forward_conv_wgrad=True)
    conv, x = model.stages[0].blocks[0].conv_dw, torch.randn(2, 40, 16, 16)
    plain = nn.functional.conv2d(x, conv.weight, conv.bias, padding=3, groups=40)
    assert type(conv(x).grad_fn).__name__ == 'DepthwiseConvFunctionBackward'
    assert torch.allclose(conv(x), plain, atol=1e-6)
    with torch.no_grad():  # evaluation and prediction: nn.Conv2d's own forward
        assert torch.equal(conv(x), plain)
    conv.weight.requires_grad_(False)  # a frozen layer: nothing to gain
    assert type(conv(x).grad_fn).__name__ != 'DepthwiseConvFunctionBackward'
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    set_depthwise(strided, forward_conv_wgrad=True)
    assert type(strided) is DepthwiseConv2d and type(strided(torch.randn(1, 8, 8, 8)).grad_fn).__name__ != \
        'DepthwiseConvFunctionBackward'  # stride 2: PyTorch's own backward


def test_forward_conv_weight_gradient_compiles():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    set_depthwise(conv, forward_conv_wgrad=True)
    x = torch.randn(2, 16, 12, 12)
    conv(x).square().sum().backward()
    eager = conv.weight.grad.clone()
    conv.weight.grad = None
    torch.compile(conv, dynamic=False)(x).square().sum().backward()
    assert torch.allclose(conv.weight.grad, eager, rtol=1e-4, atol=1e-5)


def test_device_settings_and_probe_key_follow_depthwise_wgrad():
    model = timm.create_model('convnext_atto', num_classes=2)
    DeviceSettings(torch.device('cpu'), True, 'bfloat16', False, False, 'native').prepare(model)
    assert type(model.stages[0].blocks[0].conv_dw) is nn.Conv2d
    DeviceSettings(torch.device('cpu'), True, 'bfloat16', False, False).prepare(model)  # forward_conv: the default
    assert type(model.stages[0].blocks[0].conv_dw) is DepthwiseConv2d
    args = cli.get_args_parser().parse_args(['--model', 'convnext_atto'])
    cpu, key = torch.device('cpu'), precision.probe_key
    assert args.depthwise_wgrad == 'forward_conv' and key(cpu, args).endswith(' | depthwise wgrad forward_conv')
    assert 'wgrad' not in key(cpu, args, inference=True)  # forward passes only: the same either way
    args.depthwise_wgrad = 'native'  # timings remembered before the flag existed were of this
    assert 'wgrad' not in key(cpu, args)
    args.depthwise_wgrad = 'fast'
    with pytest.raises(DataError, match='--depthwise_wgrad must be one of forward_conv, native, got fast'):
        key(cpu, args)
