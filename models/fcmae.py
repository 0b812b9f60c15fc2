"""FCMAE: fully convolutional masked autoencoder pretraining of a ConvNeXt V2 encoder (Woo et al., "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023).

Random patches (``patch_size`` = the encoder's total stride, 32) are masked. The encoder, an unchanged timm
``convnextv2_*`` model, sees only the visible pixels through *masked dense convolution*: forward pre-hooks zero the
masked positions of the input of every operation that mixes positions (stem and downsampling convolutions,
depthwise convolutions, GRN's global norm). LayerNorm and the pointwise MLP act on each position alone, so visible
features never depend on masked pixels, which is what the paper's sparse convolution computes. A light decoder
(ConvNeXt V2 blocks) fills the masked positions with a learned mask token and predicts each patch's pixels; the
loss is the mean squared error over masked patches only, optionally on per-patch normalised pixels
(``norm_pix_loss``).
"""
import timm
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import nn


def random_patch_mask(batch, grid, mask_ratio, device=None, generator=None):
    """Random patch mask with exactly round(mask_ratio * L) masked patches per image (L = grid * grid).

    Returns:
        float32 tensor [batch, grid * grid]: 1 = masked, 0 = visible.

    Raises:
        ValueError: mask_ratio outside [0, 1).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'--mask_ratio must lie in [0, 1), got {mask_ratio}')
    n_patches = grid * grid
    n_masked = int(round(n_patches * mask_ratio))
    # generator only when given: torch.compile cannot trace torch.rand(..., generator=None) at a dynamic batch size
    noise = torch.rand(batch, n_patches, device=device, **({} if generator is None else {'generator': generator}))
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise value
    return (ranks < n_masked).float()


def upsample_mask(mask, size):
    """Patch mask [B, L] (L = g*g) -> [B, 1, H, W] at a feature map's size by nearest-neighbour repetition."""
    grid = int(round(mask.shape[1] ** 0.5))
    return F.interpolate(mask.reshape(-1, 1, grid, grid), size=size, mode='nearest')


class MaskedEncoder(nn.Module):
    """A timm ConvNeXt (V2) run as a masked dense encoder.

    Args:
        encoder: ``timm.models.convnext.ConvNeXt`` (any convnextv2_* model, created with num_classes=0).

    Call ``forward(x, mask)`` with images [B, C, H, W] (H, W multiples of 32) and a patch mask [B, (H/32)*(W/32)];
    returns the feature map [B, dims[-1], H/32, W/32] with masked positions zero.
    """

    def __init__(self, encoder):
        super().__init__()
        if not isinstance(encoder, ConvNeXt):
            raise ValueError('FCMAE needs a timm ConvNeXt encoder (convnextv2_*)')
        self.encoder = encoder
        self._mask, self._keep = None, {}
        mixers = [encoder.stem[0]]
        for stage in encoder.stages:
            if isinstance(stage.downsample, nn.Sequential):
                mixers += [m for m in stage.downsample if isinstance(m, nn.Conv2d)]
            for block in stage.blocks:
                mixers.append(block.conv_dw)
                if hasattr(block.mlp, 'grn'):
                    mixers.append(block.mlp.grn)
        for module in mixers:
            module.register_forward_pre_hook(self._zero_masked)

    def _zero_masked(self, module, inputs):
        """Forward pre-hook: zero the masked positions of a mixing operation's input (no-op without a mask)."""
        if self._mask is None:
            return None
        x = inputs[0]
        channels_last = getattr(module, 'channel_dim', 1) == -1  # GRN inside an NHWC MLP
        size = tuple(x.shape[1:3] if channels_last else x.shape[-2:])
        key = (size, x.dtype, channels_last)
        if key not in self._keep:  # one keep map per resolution and layout per forward, shared by its layers
            keep = 1.0 - upsample_mask(self._mask, size).to(x.dtype)
            self._keep[key] = keep.permute(0, 2, 3, 1) if channels_last else keep
        return (x * self._keep[key],) + tuple(inputs[1:])

    def forward(self, x, mask):
        """Images [B, C, H, W] (float) and a patch mask [B, (H/32)^2] (1 = masked) -> the encoder's last feature
        map [B, dim, H/32, W/32] with the masked positions zeroed; every layer that mixes positions sees the
        masked pixels as zeros (the sparse-convolution emulation of the ConvNeXt V2 paper, Woo et al. 2023)."""
        self._mask, self._keep = mask, {}
        try:
            features = self.encoder.forward_features(x)
        finally:
            self._mask, self._keep = None, {}
        return features * (1.0 - upsample_mask(mask, features.shape[-2:]).to(features.dtype))


class FCMAE(nn.Module):
    """Masked autoencoder around a timm ConvNeXt V2 encoder.

    Args:
        model: timm model name (convnextv2_atto ... huge; V1 names work but are not what the paper pretrains).
        in_chans: image channels. mask_ratio: fraction of patches masked (paper: 0.6). decoder_depth: decoder
        blocks (paper: 1). decoder_embed_dim: decoder width (paper: 512). norm_pix_loss: normalise each target patch
        by its mean and variance. drop_path: encoder stochastic depth.

    ``forward(images)`` -> (loss: float32 scalar, pred: [B, L, p*p*C] patch predictions, mask: [B, L]).
    ``encoder_state_dict()`` gives the encoder's weights in timm format, for ``--finetune``.
    """

    def __init__(self, model='convnextv2_atto', in_chans=3, mask_ratio=0.6, decoder_depth=1, decoder_embed_dim=512,
                 norm_pix_loss=False, drop_path=0.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'--mask_ratio must lie in [0, 1), got {mask_ratio}')
        encoder = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans,
                                    drop_path_rate=drop_path)
        self.encoder = MaskedEncoder(encoder)
        self.patch_size, self.in_chans = 32, in_chans
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.proj = nn.Conv2d(encoder.num_features, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[ConvNeXtBlock(decoder_embed_dim, use_grn=True, ls_init_value=None,
                                                     conv_mlp=False) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, self.patch_size ** 2 * in_chans, kernel_size=1)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images):
        """[B, C, H, W] -> [B, L, p*p*C] with L = (H/p)(W/p), patches in row-major order."""
        p = self.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def loss(self, images, pred, mask):
        """Mean squared error over the masked patches only (float32 scalar)."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images, mask=None):
        """Images [B, C, S, S] (float, S a multiple of 32) and an optional patch mask [B, (S/32)^2] (float, 1 =
        masked; drawn at ``mask_ratio`` when None) -> (loss: float32 scalar, pred [B, (S/32)^2, 32*32*C], mask).

        Raises:
            ValueError: the images are not square with a side that is a multiple of 32.
        """
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size or h != w:
            raise ValueError(f'FCMAE needs square images with a side multiple of 32, got {h}x{w}')
        grid = h // self.patch_size
        if mask is None:
            mask = random_patch_mask(b, grid, self.mask_ratio, images.device)
        features = self.encoder(images, mask)
        x = self.proj(features)
        m = mask.reshape(b, 1, grid, grid).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        x = self.pred(self.decoder(x))  # [B, p*p*C, g, g]
        pred = x.flatten(2).transpose(1, 2)  # [B, L, p*p*C]
        return self.loss(images, pred, mask), pred, mask

    def encoder_state_dict(self):
        """The encoder's weights, in timm's names (no classifier)."""
        return self.encoder.encoder.state_dict()
