"""Isotropic ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022, section 4.4), which timm lacks.

A 16x16 stride-16 patchify stem, then ``depth`` ConvNeXt blocks at one width (timm's ``ConvNeXtBlock``), global
average pooling, LayerNorm and a linear head. Registered in timm's model registry as ``convnext_isotropic_small``
(depth 18, dim 384), ``convnext_isotropic_base`` (18, 768) and ``convnext_isotropic_large`` (36, 1024), the sizes
of the official facebookresearch/ConvNeXt code.
"""
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtBlock
from torch import nn


class ConvNeXtIsotropic(nn.Module):
    """Isotropic ConvNeXt classifier.

    Args:
        in_chans: input channels. num_classes: head outputs (0 for none). depth: blocks. dim: width.
        drop_path_rate: stochastic depth rate, linear over the blocks. ls_init_value: layer-scale init (None or 0
        for none). head_init_scale: factor on the initial head weights and bias.

    Input float tensor [B, in_chans, H, W] (H, W multiples of 16); output logits [B, num_classes].
    """

    def __init__(self, in_chans=3, num_classes=1000, depth=18, dim=384, drop_path_rate=0.0, ls_init_value=0.0,
                 head_init_scale=1.0, drop_rate=0.0, global_pool='avg', **kwargs):
        super().__init__()
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, dim, dim
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, ls_init_value=ls_init_value or None, conv_mlp=False, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def get_classifier(self):
        """The classifier layer (``nn.Linear(dim, num_classes)``, or ``nn.Identity`` without classes), as timm's
        models return it."""
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the classifier by a new ``nn.Linear(dim, num_classes)`` (``nn.Identity`` for 0), as timm's
        ``reset_classifier``; ``global_pool`` is accepted for that interface and ignored (the head averages)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        """[B, C, H, W] -> feature map [B, dim, H/16, W/16]."""
        return self.blocks(self.stem(x))

    def forward_head(self, x, pre_logits=False):
        """Feature map -> logits [B, num_classes] (pooled, normalised features [B, dim] if ``pre_logits``)."""
        x = self.norm(x.mean((-2, -1)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        """Images [B, C, H, W] (float, H and W multiples of 16) -> logits [B, num_classes] (float)."""
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model):
    """Map an official isotropic checkpoint (dwconv, pwconv1/2) to this module's names (timm's block names)."""
    if 'model' in state_dict:
        state_dict = state_dict['model']
    return {k.replace('dwconv', 'conv_dw').replace('pwconv', 'mlp.fc'): v for k, v in state_dict.items()}


def _create(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(ConvNeXtIsotropic, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


def _cfg(**kwargs):
    return {'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14), 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'first_conv': 'stem', 'classifier': 'head', **kwargs}


default_cfgs = generate_default_cfgs({f'convnext_isotropic_{size}.untrained': _cfg()
                                      for size in ('small', 'base', 'large')})


@register_model
def convnext_isotropic_small(pretrained=False, **kwargs):
    """Isotropic ConvNeXt-S: depth 18, dim 384."""
    return _create('convnext_isotropic_small', pretrained, **dict(dict(depth=18, dim=384), **kwargs))


@register_model
def convnext_isotropic_base(pretrained=False, **kwargs):
    """Isotropic ConvNeXt-B: depth 18, dim 768."""
    return _create('convnext_isotropic_base', pretrained, **dict(dict(depth=18, dim=768), **kwargs))


@register_model
def convnext_isotropic_large(pretrained=False, **kwargs):
    """Isotropic ConvNeXt-L: depth 36, dim 1024."""
    return _create('convnext_isotropic_large', pretrained, **dict(dict(depth=36, dim=1024), **kwargs))
