"""Model factory: every ConvNeXt V1/V2 of timm's registry, the isotropic ConvNeXt timm lacks, and a loader of local
checkpoints in timm, official ConvNeXt (V1, V2, isotropic) and safetensors formats."""
import logging
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn

from utils import DataError
from . import convnext_isotropic, resnet_roadmap
from .convnext_isotropic import ConvNeXtIsotropic
from .resnet_roadmap import ResNetRoadmap

log = logging.getLogger('models')
HEAD_KEYS = ('head.fc.weight', 'head.fc.bias', 'head.weight', 'head.bias')
INPUT_STRIDE = 32  # ConvNeXt's total downsampling (4x stem, three 2x stages); FCMAE masks 32x32 patches


def check_input_size(input_size):
    """Return ``input_size`` if ConvNeXt (and FCMAE's patch mask) can take it: a positive multiple of 32 pixels.

    Raises:
        DataError: one line naming --input_size.
    """
    if input_size <= 0 or input_size % INPUT_STRIDE:
        raise DataError(f'--input_size must be a positive multiple of {INPUT_STRIDE}, got {input_size}')
    return input_size


def is_timm_convnext(model):
    """True for the names of timm's ConvNeXt V1/V2 (not the isotropic or roadmap models), the ones whose
    constructor takes ``norm_layer`` and ``global_pool``."""
    return model.startswith('convnext') and 'isotropic' not in model


def check_norm_layer(model, norm_layer):
    """Return ``norm_layer`` ('layernorm' or 'batchnorm') if ``model`` can take it: BatchNorm only in timm's
    ConvNeXt V1/V2 (not the isotropic or roadmap models).

    Raises:
        DataError: one line naming --norm_layer and the model.
    """
    if norm_layer == 'batchnorm' and not is_timm_convnext(model):
        raise DataError(f'--norm_layer batchnorm: only timm ConvNeXt V1/V2 models take it, not {model}')
    return norm_layer


def build_model(args):
    """Create the classifier named ``args.model`` with ``timm.create_model`` (no download; weights are random).

    Uses ``args.nb_classes``, ``drop_path``, ``in_chans``, ``head_init_scale`` and, when set, ``layer_scale_init_value``
    (V1, isotropic and roadmap models; ConvNeXt V2 has no layer scale), ``global_pool`` (timm's head pooling:
    avg, max or avgmax, V1/V2 only), ``norm_layer`` (``batchnorm``: timm's
    ConvNeXt with ``norm_layer='batchnorm2d', conv_mlp=True``, V1/V2 only); ``--model resnet`` (the ResNet-50 to
    ConvNeXt-T roadmap, models/resnet_roadmap.py) also takes the ``--resnet_*`` flags.

    Returns:
        torch.nn.Module mapping float [B, in_chans, H, W] to logits [B, nb_classes].

    Raises:
        DataError: the name is not in timm's registry, a --resnet_* value the roadmap network cannot take, or
            --norm_layer batchnorm or a --global_pool other than avg with a model other than timm's ConvNeXt V1/V2.
    """
    if args.model not in timm.list_models():
        near = timm.list_models(f'*{args.model.split("_")[0]}*')[:8]
        raise DataError(f'--model {args.model}: unknown model name; e.g. {", ".join(near) or "convnext_atto"}')
    kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path, in_chans=args.in_chans)
    if 'convnext' in args.model or args.model == 'resnet':
        kwargs['head_init_scale'] = args.head_init_scale
        if getattr(args, 'layer_scale_init_value', None) is not None and 'convnextv2' not in args.model:
            kwargs['ls_init_value'] = args.layer_scale_init_value
    pool = getattr(args, 'global_pool', 'avg')  # runs saved before --global_pool existed pooled by average
    if pool != 'avg':
        if not is_timm_convnext(args.model):
            raise DataError(f'--global_pool {pool}: only timm ConvNeXt V1/V2 models take it, not {args.model}')
        kwargs['global_pool'] = pool
    if check_norm_layer(args.model, getattr(args, 'norm_layer', 'layernorm')) == 'batchnorm':
        kwargs.update(norm_layer='batchnorm2d', conv_mlp=True)  # timm's ConvNeXt needs rank-4 norms for BatchNorm
    if args.model == 'resnet':
        try:
            kwargs.update(resnet_roadmap.options_from_args(args))
        except ValueError as e:
            raise DataError(str(e)) from None
    return timm.create_model(args.model, pretrained=False, **kwargs)


def read_checkpoint(path):
    """Read a checkpoint file or URL into a dict.

    ``.safetensors`` through safetensors; other files with ``torch.load(weights_only=True)``; http(s) URLs through
    ``torch.hub.load_state_dict_from_url`` (needs a network).

    Raises:
        DataError: missing or unreadable file (one line naming it).
    """
    path = str(path)
    try:
        if path.startswith(('http://', 'https://')):
            return torch.hub.load_state_dict_from_url(path, map_location='cpu', weights_only=True)
        if not Path(path).is_file():
            raise DataError(f'{path}: checkpoint file not found')
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        return torch.load(path, map_location='cpu', weights_only=True)
    except DataError:
        raise
    except Exception as e:  # pickle, zip and safetensors errors have no common base class
        raise DataError(f'{path}: unreadable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})') \
            from None


def extract_state_dict(checkpoint, model_key='model|model_ema|module|state_dict'):
    """The weights inside a checkpoint dict: the first of the ``|``-separated keys present, else the dict itself.

    A ``module.`` prefix (DataParallel/DDP) is stripped.

    Returns:
        dict name -> tensor.
    """
    state = checkpoint
    for key in model_key.split('|'):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            log.info(f'loading weights under key "{key}"')
            state = checkpoint[key]
            break
    return {(k[7:] if k.startswith('module.') else k): v for k, v in state.items() if torch.is_tensor(v)}


def remap_official(state, model):
    """Map official ConvNeXt V1/V2 and isotropic names to timm's with timm's and this package's filters."""
    if isinstance(model, ConvNeXtIsotropic):
        return convnext_isotropic.checkpoint_filter_fn(state, model)
    if any(k.startswith(('downsample_layers.', 'stages.0.0.')) for k in state):
        return convnext_filter_fn(state, model)
    return state


def load_pretrained(model, path, model_key='model|model_ema|module|state_dict', path_name=None):
    """Load local (or URL) weights into ``model`` for fine-tuning (``--finetune``).

    Handles timm-format checkpoints, the official ConvNeXt (facebookresearch/ConvNeXt) and ConvNeXt V2 formats
    (remapped by timm's ``convnext.checkpoint_filter_fn``) and the official isotropic format. A classifier head whose
    shape differs from the model's is dropped (the model keeps its fresh head); 3-channel stem weights are adapted
    to a 1-channel model (timm's ``adapt_input_conv``). Missing and unexpected keys are logged.

    Returns:
        dict with lists 'missing', 'unexpected', 'dropped_head'.

    Raises:
        DataError: unreadable file, or weights of another architecture (body tensors of other shapes, or no name in
            common with the model).
    """
    name = path_name or str(path)
    try:
        state = remap_official(extract_state_dict(read_checkpoint(path), model_key), model)
    except (KeyError, RuntimeError) as e:  # the filters look up and reshape by the model's own tensors
        raise DataError(f'{name}: checkpoint does not fit --model {model.__class__.__name__} ({e}); '
                        f'is it another architecture?') from None
    own = model.state_dict()
    dropped, mismatched = [], []
    for k in list(state):
        if k not in own or state[k].shape == own[k].shape:
            continue
        v, target = state[k], own[k].shape
        if k in HEAD_KEYS:
            dropped.append(k)
            del state[k]
        elif v.ndim == 4 and v.shape[0] == target[0] and v.shape[2:] == target[2:] and v.shape[1] == 3:
            state[k] = adapt_input_conv(target[1], v)
            log.info(f'adapted {k} from 3 to {target[1]} input channels')
        elif v.squeeze().shape == own[k].squeeze().shape:  # e.g. Linear [O, I] vs 1x1 conv [O, I, 1, 1]
            state[k] = v.reshape(target)
        else:
            mismatched.append(f'{k} {tuple(v.shape)} vs {tuple(target)}')
    if mismatched:
        raise DataError(f'{name}: checkpoint does not fit --model {model.__class__.__name__} '
                        f'({len(mismatched)} tensor(s) differ, e.g. {mismatched[0]}); is it another architecture?')
    common = set(state) & set(own)
    if not common:
        raise DataError(f'{name}: no parameter name in common with the model; is it another architecture?')
    result = model.load_state_dict(state, strict=False)
    if dropped:
        log.info(f'{name}: dropped head {", ".join(dropped)} (other number of classes)')
    if result.missing_keys:
        log.warning(f'{name}: missing keys {result.missing_keys}')
    if result.unexpected_keys:
        log.warning(f'{name}: unexpected keys {result.unexpected_keys}')
    return {'missing': list(result.missing_keys), 'unexpected': list(result.unexpected_keys), 'dropped_head': dropped}


__all__ = ['ConvNeXtIsotropic', 'ResNetRoadmap', 'build_model', 'check_input_size', 'extract_state_dict',
           'load_pretrained', 'read_checkpoint']
