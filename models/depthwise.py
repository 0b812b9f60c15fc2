"""Depthwise convolutions in fp32 channels_last inside bf16 autocast (``--depthwise_fp32``).

A ConvNeXt block's 7x7 depthwise convolution is a small share of its FLOPs but, on some CPUs, most of a bf16
training step: on a 2-core Intel Xeon with AMX its backward took 59% of a convnext_atto step (torch.profiler), and
ran 3.6x faster in fp32 channels_last than in bf16 in the contiguous layout (oneDNN has no fast bf16 depthwise
backward there). Running these convolutions alone in fp32 channels_last while the rest of the model stays in bf16
autocast made a whole step about 1.4x faster on that machine, and no faster on an AMD EPYC; ``precision.choose``
measures it per machine like the other candidates.

The swap changes a module's class only: parameters, buffers, hooks and ``state_dict`` keys stay as they are, so
checkpoints do not depend on it.
"""
import torch
from torch import nn


class DepthwiseConv2dFP32(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward runs in fp32 on a channels_last input, outside autocast.

    ``forward(x)``: x [B, C, H, W] of any float dtype and layout -> float32 [B, C_out, H', W'] in channels_last.
    Gradients flow back to ``x`` in its own dtype (the cast is differentiable).
    """

    def forward(self, x):
        """See the class docstring."""
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_forward(x.float().contiguous(memory_format=torch.channels_last), self.weight, self.bias)


def is_depthwise(module):
    """Whether ``module`` is a plain (or already swapped) ``nn.Conv2d`` with one group per channel (C_in = C_out =
    groups > 1); subclasses with their own forward (e.g. timm's Conv2dSame) are left out."""
    return type(module) in (nn.Conv2d, DepthwiseConv2dFP32) and \
        1 < module.groups == module.in_channels == module.out_channels


def set_depthwise_fp32(model, enabled):
    """Switch the depthwise convolutions of ``model`` (in place) to ``DepthwiseConv2dFP32`` (``enabled``) or back
    to ``nn.Conv2d``.

    Args:
        model: nn.Module (also a ``torch.compile`` wrapper or DDP: their submodules are switched). enabled: bool.

    Returns:
        int: how many convolutions are depthwise (switched or already in the wanted class).
    """
    count = 0
    for module in model.modules():
        if is_depthwise(module):
            module.__class__ = DepthwiseConv2dFP32 if enabled else nn.Conv2d
            count += 1
    return count


__all__ = ['DepthwiseConv2dFP32', 'is_depthwise', 'set_depthwise_fp32']
