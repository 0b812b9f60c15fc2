"""Depthwise convolutions made fast to train on a CPU: the weight gradient as a forward convolution
(``--depthwise_wgrad``), and the convolutions in fp32 channels_last inside bf16 autocast (``--depthwise_fp32``).

A ConvNeXt block's 7x7 depthwise convolution is a small share of its FLOPs but, on a CPU, much of a training step,
and nearly all of that is the weight gradient: PyTorch's ``convolution_backward`` (oneDNN) took 119 ms of a
convnext_atto step at 224 px, batch 16, bf16 channels_last on a 2-core AMD EPYC with AVX512-BF16, against 8 ms for
the forward pass of the same convolutions and 9 ms for their input gradient (fp32: 74, 9 and 11 ms; contiguous
memory 285-304 ms). The weight gradient of a depthwise convolution (stride 1, dilation 1) is itself a depthwise
correlation: for channel c, ``dW[c, i, j] = sum_n sum_{h,w} x_pad[n, c, h+i, w+j] * dY[n, c, h, w]``, which is a
forward depthwise convolution of the padded input (N*C channels, one image) with each sample's output gradient as
its kernel, summed over the samples (in fp32). Run through the fast forward kernel that way it took 3-6x less time
in bf16; on that machine, one process alternating the two ways on the same model, a compiled training step of
convnextv2_atto (224 px, batch 16) ran 1.13x faster in bf16 channels_last and 1.10x with fp32 depthwise convolutions,
and an FCMAE step (128 px, batch 32) 1.25x (``benchmark.py`` measures whole pipelines). The forward pass and the
input gradient are PyTorch's own.

Separately, bf16 depthwise convolutions as a whole were slow on a 2-core Intel Xeon with AMX: running them alone in
fp32 channels_last while the rest of the model stays in bf16 autocast made a whole step about 1.4x faster there,
and no faster on an AMD EPYC; ``precision.choose`` measures that per machine like the other candidates.

The swaps change a module's class (and one plain attribute) only: parameters, buffers, hooks and ``state_dict`` keys
stay as they are, so checkpoints do not depend on them. On CUDA (cuDNN's weight gradient is fast), in evaluation and
prediction (run without gradients) and during ONNX export the convolutions run as ``nn.Conv2d`` does.
"""
import torch
import torch.nn.functional as F
from torch import nn

WGRAD_CHOICES = ('forward_conv', 'native')


class DepthwiseConvFunction(torch.autograd.Function):
    """A depthwise convolution, stride 1, dilation 1, zero padding, whose weight gradient is computed as a forward
    depthwise convolution per sample (see the module docstring); the input gradient is PyTorch's
    ``convolution_backward``.

    ``apply(x, weight, bias, padding)``: x [N, C, H, W], weight [C, 1, kh, kw], bias [C] or None, all of one float
    dtype; padding (ph, pw) ints -> [N, C, H + 2ph - kh + 1, W + 2pw - kw + 1] in that dtype. The weight and bias
    gradients are summed over the samples in fp32 and returned in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        """See the class docstring."""
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = tuple(padding), bias is not None
        return F.conv2d(x, weight, bias, padding=ctx.padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        """Gradients of x, weight and bias (None where not needed)."""
        x, weight = ctx.saved_tensors
        (ph, pw), (n, c, h, w) = ctx.padding, x.shape
        grad_x = grad_w = grad_b = None
        with torch.autocast(x.device.type, enabled=False):  # backward() may be called inside an autocast block
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [ph, pw], [1, 1],
                                                             False, [0, 0], c, [True, False, False])[0]
            if ctx.needs_input_grad[1]:
                x_pad = F.pad(x, (pw, pw, ph, ph)).reshape(1, n * c, h + 2 * ph, w + 2 * pw)
                per_sample = F.conv2d(x_pad, grad_out.reshape(n * c, 1, *grad_out.shape[2:]), groups=n * c)
                grad_w = per_sample.reshape(n, c, *weight.shape[2:]).sum(0, dtype=torch.float32)
                grad_w = grad_w.unsqueeze(1).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_out.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def uses_forward_conv_wgrad(conv, x):
    """Whether ``conv`` (a depthwise ``nn.Conv2d``) takes ``DepthwiseConvFunction`` for the input ``x``: its
    ``forward_conv_wgrad`` attribute is set, x is on the CPU, gradients are being recorded for its weight, and the
    convolution has stride 1, dilation 1 and integer zero padding (ConvNeXt's); not while scripting or exporting."""
    return (getattr(conv, 'forward_conv_wgrad', False) and x.device.type == 'cpu' and torch.is_grad_enabled()
            and conv.weight.requires_grad and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)
            and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export())


def depthwise_forward(conv, x):
    """``conv(x)`` for a depthwise ``nn.Conv2d``: through ``DepthwiseConvFunction`` where
    ``uses_forward_conv_wgrad`` holds, in autocast's dtype when autocast is on (x, weight and bias cast, the casts
    differentiable), else ``conv._conv_forward``. x [N, C, H, W] -> [N, C, H', W']."""
    if not uses_forward_conv_wgrad(conv, x):
        return conv._conv_forward(x, conv.weight, conv.bias)
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return DepthwiseConvFunction.apply(x, weight, bias, conv.padding)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` whose weight gradient, when training on the CPU, is a forward convolution
    (``DepthwiseConvFunction``). ``forward(x)``: x [N, C, H, W] -> [N, C, H', W'], the dtype autocast gives."""

    forward_conv_wgrad = True

    def forward(self, x):
        """See the class docstring."""
        return depthwise_forward(self, x)


class DepthwiseConv2dFP32(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward runs in fp32 on a channels_last input, outside autocast; with the attribute
    ``forward_conv_wgrad`` set (``set_depthwise``), its weight gradient as in ``DepthwiseConv2d``.

    ``forward(x)``: x [B, C, H, W] of any float dtype and layout -> float32 [B, C_out, H', W'] in channels_last.
    Gradients flow back to ``x`` in its own dtype (the cast is differentiable).
    """

    def forward(self, x):
        """See the class docstring."""
        with torch.autocast(x.device.type, enabled=False):
            return depthwise_forward(self, x.float().contiguous(memory_format=torch.channels_last))


def is_depthwise(module):
    """Whether ``module`` is a plain (or already swapped) ``nn.Conv2d`` with one group per channel (C_in = C_out =
    groups > 1); subclasses with their own forward (e.g. timm's Conv2dSame) are left out."""
    return type(module) in (nn.Conv2d, DepthwiseConv2d, DepthwiseConv2dFP32) and \
        1 < module.groups == module.in_channels == module.out_channels


def set_depthwise(model, fp32=False, forward_conv_wgrad=False):
    """Switch the depthwise convolutions of ``model`` (in place): ``DepthwiseConv2dFP32`` with ``fp32``, else
    ``DepthwiseConv2d`` with ``forward_conv_wgrad``, else back to ``nn.Conv2d``.

    Args:
        model: nn.Module (also a ``torch.compile`` wrapper or DDP: their submodules are switched). fp32: bool, run
            them in fp32 channels_last outside autocast. forward_conv_wgrad: bool, compute their weight gradient
            as a forward convolution when training on the CPU.

    Returns:
        int: how many convolutions are depthwise (switched or already in the wanted class).
    """
    count = 0
    for module in model.modules():
        if is_depthwise(module):
            module.__dict__.pop('forward_conv_wgrad', None)
            if fp32:
                module.__class__ = DepthwiseConv2dFP32
                module.forward_conv_wgrad = bool(forward_conv_wgrad)
            else:
                module.__class__ = DepthwiseConv2d if forward_conv_wgrad else nn.Conv2d
            count += 1
    return count



__all__ = ['DepthwiseConvFunction', 'DepthwiseConv2d', 'DepthwiseConv2dFP32', 'WGRAD_CHOICES', 'depthwise_forward',
           'is_depthwise', 'set_depthwise', 'uses_forward_conv_wgrad']
