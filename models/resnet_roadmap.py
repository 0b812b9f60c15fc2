"""The ResNet-50 to ConvNeXt-T roadmap of Liu et al., "A ConvNet for the 2020s" (CVPR 2022, section 2, figure 2).

One network whose options are the paper's "modernization" steps; each step adds one option to the ones before:

    step                        option (main.py flag)               what changes
    ResNet-50                   (defaults)                          torchvision's ResNet-50 exactly
    stage ratio                 layers=(3, 3, 9, 3)                 --resnet_layers 3-3-9-3
    patchify stem               stem='patch_embed'                  4x4 stride-4 conv + norm instead of 7x7 + max-pool
    ResNeXt-ify                 depthwise=True, embed_dim=96        spatial conv per channel; widths 96-192-384-768
    inverted bottleneck         block='inverted'                    1x1 expands to 4x, spatial conv on the wide part
    depthwise conv first        conv_first=True                     spatial conv moved to the start of the block
    large kernel                kernel_size=7
    GELU                        act_layer='gelu'
    fewer activations           del_act=True                        one activation, between the two 1x1 convs
    fewer norms                 reorg_norm=True                     one norm, after the spatial conv; convs with bias
    LayerNorm                   norm_layer='ln'                     channel LayerNorm instead of BatchNorm
    final norm                  final_norm=True                     norm on the pooled features before the classifier
    separate downsampling       sep_downsample=True                 norm + 2x2 stride-2 conv between stages, blocks
                                                                    without stride or projection, layer scale:
                                                                    ConvNeXt-T

With every option the module names and shapes are timm's ``convnext_tiny`` (apart from the 1x1 convs that timm
writes as Linear layers: ``convnext_state_dict`` maps them), and the network computes what timm's does. Registered in
timm's registry as ``resnet`` (``timm.create_model('resnet', **options)``).
"""
import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import register_model
from torch import nn

ACT_LAYERS = {'relu': nn.ReLU, 'gelu': nn.GELU}
NORM_LAYERS = ('bn', 'ln')
STEMS = ('resnet', 'patch_embed')
BLOCKS = ('bottleneck', 'inverted')
RESNET50_LAYERS = (3, 4, 6, 3)
# The roadmap in order: (step name, main.py flag, value); step k sets the flags of steps 1..k.
ROADMAP_STEPS = (
    ('stage ratio', 'resnet_layers', '3-3-9-3'),
    ('patchify stem', 'resnet_stem', 'patch_embed'),
    ('depthwise conv', 'resnet_depthwise', True),
    ('width 96', 'resnet_embed_dim', 96),
    ('inverted bottleneck', 'resnet_block', 'inverted'),
    ('depthwise conv first', 'resnet_conv_first', True),
    ('kernel 7', 'resnet_kernel_size', 7),
    ('GELU', 'resnet_act_layer', 'gelu'),
    ('fewer activations', 'resnet_del_act', True),
    ('fewer norms', 'resnet_reorg_norm', True),
    ('LayerNorm', 'resnet_norm_layer', 'ln'),
    ('final norm', 'resnet_final_norm', True),
    ('separate downsampling (ConvNeXt-T)', 'resnet_sep_downsample', True),
)


def norm2d(kind, dim):
    """A norm over the channels of [B, C, H, W]: BatchNorm2d ('bn') or timm's LayerNorm2d ('ln', eps 1e-6)."""
    return nn.BatchNorm2d(dim) if kind == 'bn' else LayerNorm2d(dim, eps=1e-6)


class RoadmapBlock(nn.Module):
    """One residual block of the roadmap: a bottleneck (ResNet) or inverted bottleneck (ConvNeXt) in any of its steps.

    Args:
        in_dim, out_dim: int channels in and out. stride: int, 1 or 2 (on the spatial conv).
        opts: dict of the network's options (see ResNetRoadmap). drop_path: float, stochastic depth rate.
        ls_init_value: float or None, layer scale init (a learnable per-channel gain on the residual branch).

    Input float [B, in_dim, H, W]; output [B, out_dim, H / stride, W / stride].
    """

    def __init__(self, in_dim, out_dim, stride, opts, drop_path=0.0, ls_init_value=None):
        super().__init__()
        hidden = out_dim * 4 if opts['block'] == 'inverted' else out_dim // 4
        spatial = in_dim if opts['conv_first'] else hidden
        k, bias, norm, act = opts['kernel_size'], opts['reorg_norm'], opts['norm_layer'], ACT_LAYERS[opts['act_layer']]
        self.conv_first, self.del_act, self.reorg = opts['conv_first'], opts['del_act'], opts['reorg_norm']
        self.conv_dw = nn.Conv2d(spatial, spatial, k, stride, k // 2, groups=spatial if opts['depthwise'] else 1,
                                 bias=bias)
        self.norm = norm2d(norm, spatial)
        self.fc1 = nn.Conv2d(in_dim, hidden, 1, bias=bias)
        self.fc2 = nn.Conv2d(hidden, out_dim, 1, bias=bias)
        self.norm_fc1 = nn.Identity() if self.reorg else norm2d(norm, hidden)
        self.norm_fc2 = nn.Identity() if self.reorg else norm2d(norm, out_dim)
        self.act = act()
        self.gamma = nn.Parameter(torch.full((out_dim,), float(ls_init_value))) if ls_init_value else None
        self.shortcut = nn.Identity()
        if stride != 1 or in_dim != out_dim:
            self.shortcut = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride, bias=bias), norm2d(norm, out_dim))
        self.post_act = nn.Identity() if self.del_act else act()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        """[B, in_dim, H, W] -> [B, out_dim, H / stride, W / stride]."""
        shortcut = self.shortcut(x)
        keep = nn.Identity() if self.del_act else self.act  # activations outside the one between the 1x1 convs
        spatial = lambda t: keep(self.norm(self.conv_dw(t)))  # noqa: E731
        if self.conv_first:
            x = spatial(x)
        x = self.act(self.norm_fc1(self.fc1(x)))
        if not self.conv_first:
            x = spatial(x)
        x = self.norm_fc2(self.fc2(x))
        if self.gamma is not None:
            x = x * self.gamma.reshape(1, -1, 1, 1)
        return self.post_act(self.drop_path(x) + shortcut)


class RoadmapStage(nn.Module):
    """A stage: an optional separate downsampling layer (norm + 2x2 stride-2 conv), then blocks."""

    def __init__(self, downsample, blocks):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        """[B, C_in, H, W] -> [B, C_out, H', W']."""
        return self.blocks(self.downsample(x))


class RoadmapHead(nn.Module):
    """Global average pooling, an optional norm of the pooled features, and the linear classifier."""

    def __init__(self, dim, num_classes, norm):
        super().__init__()
        self.norm = (norm2d(norm, dim)) if norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        """[B, C, H, W] -> logits [B, num_classes]."""
        return self.fc(self.norm(x.mean((2, 3), keepdim=True)).flatten(1))


class ResNetRoadmap(nn.Module):
    """ResNet-50, ConvNeXt-T, or any step between them (Liu et al. 2022, figure 2).

    Args:
        in_chans: int input channels. num_classes: int head outputs (0: no classifier).
        layers: 4 ints, blocks per stage. stem: 'resnet' (7x7 stride-2 conv, norm, act, 3x3 max-pool) or
            'patch_embed' (4x4 stride-4 conv with bias, norm). depthwise: bool, the spatial conv per channel.
        embed_dim: int, the first stage's width (bottleneck: its inner width; inverted: its block width).
        block: 'bottleneck' or 'inverted'. conv_first: bool, the spatial conv first in the block.
        kernel_size: int, of the spatial conv. act_layer: 'relu' or 'gelu'. del_act: bool, one activation per block.
        reorg_norm: bool, one norm per block (after the spatial conv) and convs with bias.
        norm_layer: 'bn' or 'ln'. final_norm: bool, norm on the pooled features.
        sep_downsample: bool, separate downsampling layers between stages and layer scale in the blocks.
        drop_path_rate: float, stochastic depth, linear over the blocks. ls_init_value: float, layer scale init
            (with sep_downsample). head_init_scale: float factor on the initial classifier weights.

    Input float [B, in_chans, H, W] (H, W multiples of 32); output logits [B, num_classes].

    Raises:
        ValueError: an unknown option value.
    """

    def __init__(self, in_chans=3, num_classes=1000, layers=RESNET50_LAYERS, stem='resnet', depthwise=False,
                 embed_dim=64, block='bottleneck', conv_first=False, kernel_size=3, act_layer='relu', del_act=False,
                 reorg_norm=False, norm_layer='bn', final_norm=False, sep_downsample=False, drop_path_rate=0.0,
                 ls_init_value=1e-6, head_init_scale=1.0, **kwargs):
        super().__init__()
        opts = dict(block=block, conv_first=conv_first, kernel_size=kernel_size, depthwise=depthwise,
                    act_layer=act_layer, del_act=del_act, reorg_norm=reorg_norm, norm_layer=norm_layer)
        check_options(layers, stem, block, kernel_size, act_layer, norm_layer, embed_dim)
        widths = [embed_dim * 2 ** i * (4 if block == 'bottleneck' else 1) for i in range(4)]
        if stem == 'resnet':
            self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 2, 3, bias=False),
                                      norm2d(norm_layer, embed_dim),
                                      ACT_LAYERS[act_layer](), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 4, 4), norm2d(norm_layer, embed_dim))
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        stages, dim, n = [], embed_dim, 0
        for i, (depth, width) in enumerate(zip(layers, widths)):
            down = nn.Identity()
            if sep_downsample and i > 0:
                down = nn.Sequential(norm2d(norm_layer, dim), nn.Conv2d(dim, width, 2, 2))
                dim = width
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 and not sep_downsample else 1
                blocks.append(RoadmapBlock(dim, width, stride, opts, rates[n],
                                           ls_init_value if sep_downsample else None))
                dim, n = width, n + 1
            stages.append(RoadmapStage(down, blocks))
        self.stages = nn.Sequential(*stages)
        self.num_classes, self.num_features = num_classes, dim
        self.head = RoadmapHead(dim, num_classes, norm_layer if final_norm else None)
        self.apply(self._init_weights if norm_layer == 'ln' else self._init_resnet)
        if num_classes > 0:
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m):
        """ConvNeXt's init: truncated normal (std 0.02) weights, zero biases."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _init_resnet(m):
        """torchvision's ResNet init: Kaiming normal (fan out) conv weights, unit norm gains, zero biases."""
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x):
        """[B, in_chans, H, W] -> [B, num_features, H / 32, W / 32]."""
        return self.stages(self.stem(x))

    def forward(self, x):
        """[B, in_chans, H, W] -> logits [B, num_classes]."""
        return self.head(self.forward_features(x))


def check_options(layers, stem, block, kernel_size, act_layer, norm_layer, embed_dim):
    """Raise ValueError naming the option when a roadmap option has a value the network cannot take."""
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f'--resnet_layers needs 4 block counts >= 1, got {"-".join(map(str, layers))}')
    for name, value, allowed in (('stem', stem, STEMS), ('block', block, BLOCKS),
                                 ('act_layer', act_layer, tuple(ACT_LAYERS)), ('norm_layer', norm_layer, NORM_LAYERS)):
        if value not in allowed:
            raise ValueError(f'--resnet_{name} must be one of {", ".join(allowed)}, got {value}')
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'--resnet_kernel_size must be an odd number of pixels, got {kernel_size}')
    if embed_dim < 4 or embed_dim % 4:
        raise ValueError(f'--resnet_embed_dim must be a multiple of 4, got {embed_dim}')


ROADMAP_FLAGS = ('resnet_layers', 'resnet_stem', 'resnet_depthwise', 'resnet_embed_dim', 'resnet_block',
                 'resnet_conv_first', 'resnet_kernel_size', 'resnet_act_layer', 'resnet_del_act', 'resnet_reorg_norm',
                 'resnet_norm_layer', 'resnet_final_norm', 'resnet_sep_downsample')


def options_from_args(args):
    """ResNetRoadmap keyword options from main.py's ``--resnet_*`` flags (an argparse.Namespace).

    Raises:
        ValueError: a flag value the network cannot take (one line naming the flag).
    """
    opts = {flag[len('resnet_'):]: getattr(args, flag) for flag in ROADMAP_FLAGS if flag != 'resnet_layers'}
    opts['layers'] = parse_layers(args.resnet_layers)
    check_options(opts['layers'], opts['stem'], opts['block'], opts['kernel_size'], opts['act_layer'],
                  opts['norm_layer'], opts['embed_dim'])
    return opts


def parse_layers(text):
    """``'3-3-9-3'`` -> (3, 3, 9, 3). Raises ValueError on anything else than four dash-separated integers."""
    try:
        layers = tuple(int(v) for v in str(text).split('-'))
    except ValueError:
        raise ValueError(f'--resnet_layers takes four block counts like 3-4-6-3, got {text}') from None
    check_options(layers, 'resnet', 'bottleneck', 3, 'relu', 'bn', 64)
    return layers


def convnext_state_dict(state):
    """Map a timm ConvNeXt (V1) state dict onto the fully modernised roadmap network.

    Args:
        state: dict name -> tensor of timm's ``convnext_*`` (``mlp.fc1``/``mlp.fc2`` Linear weights [out, in]).
    Returns:
        dict for ``ResNetRoadmap.load_state_dict``: ``mlp.fcN`` renamed ``fcN``, weights reshaped to 1x1 convs
        [out, in, 1, 1]; other names unchanged.
    """
    out = {}
    for key, value in state.items():
        if '.mlp.fc' in key:
            key = key.replace('.mlp.fc', '.fc')
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
        out[key] = value
    return out


TORCHVISION_NAMES = {'conv1': 'fc1', 'bn1': 'norm_fc1', 'conv2': 'conv_dw', 'bn2': 'norm', 'conv3': 'fc2',
                     'bn3': 'norm_fc2', 'downsample': 'shortcut'}


def torchvision_state_dict(state):
    """Map a torchvision ``resnet50`` state dict onto the roadmap network with its default options.

    Args:
        state: dict name -> tensor of ``torchvision.models.resnet50()``.
    Returns:
        dict for ``ResNetRoadmap.load_state_dict`` (same tensors, renamed: ``conv1``/``bn1`` -> ``stem.0``/``stem.1``,
        ``layerN.B.*`` -> ``stages.{N-1}.blocks.B.*``, ``fc`` -> ``head.fc``).
    """
    out = {}
    for key, value in state.items():
        parts = key.split('.')
        if parts[0].startswith('layer'):
            parts = ['stages', str(int(parts[0][5:]) - 1), 'blocks', parts[1], TORCHVISION_NAMES[parts[2]], *parts[3:]]
        elif parts[0] in ('conv1', 'bn1'):
            parts = ['stem', '0' if parts[0] == 'conv1' else '1', *parts[1:]]
        elif parts[0] == 'fc':
            parts = ['head', *parts]
        out['.'.join(parts)] = value
    return out


@register_model
def resnet(pretrained=False, **kwargs):
    """The roadmap network (ResNet-50 by default); keyword arguments are ResNetRoadmap's options."""
    if pretrained:
        raise ValueError('the roadmap network has no pretrained weights; use --finetune with a local checkpoint')
    return ResNetRoadmap(**kwargs)
