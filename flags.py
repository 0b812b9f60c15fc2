"""The command line of main.py: its flags in argument groups (the official ConvNeXt and defect scripts' names) and
their checks. main.py, run.py (sweep flag names), export.py and predict.py (defaults under a checkpoint's saved
flags) read them from here.
"""
import argparse
import importlib.util

from engine import optimizer_class
from imaging import PADDING_MODES
from labels import check_ratio, head_classes, parse_label_list
from metrics import check_metric_name
from models import check_input_size, check_norm_layer, resnet_roadmap
from models.depthwise import WGRAD_CHOICES
from softLabelLoss import LOSS_FUNCTIONS
from utils import DataError, str2bool, str2bool_or_auto


def add_model_flags(p):
    """Flags of the model group."""
    g = p.add_argument_group('model')
    g.add_argument('--model', default='convnext_atto',
                   help='any timm ConvNeXt V1/V2 name, convnext_isotropic_*, or resnet (ResNet-to-ConvNeXt roadmap)')
    g.add_argument('--nb_classes', type=int, default=2, choices=[2, 4], help='head: 2 (neg, pos) or 4 classes')
    g.add_argument('--in_chans', type=int, default=3, choices=[1, 3])
    g.add_argument('--input_size', type=int, default=224, help='pixels (square)')
    g.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--layer_scale_init_value', type=float, default=None, help='layer scale init (V1; timm default)')
    g.add_argument('--head_init_scale', type=float, default=1.0)
    g.add_argument('--norm_layer', default='layernorm', choices=['layernorm', 'batchnorm'],
                   help="ConvNeXt V1/V2 norm: layernorm (the papers') or batchnorm (timm's norm_layer=batchnorm2d "
                        'with conv_mlp: BatchNorm2d after each depthwise conv, in the stem and downsampling)')
    g.add_argument('--global_pool', default='avg', choices=['avg', 'max', 'avgmax'],
                   help="timm ConvNeXt V1/V2 head pooling over the last feature map: avg (the papers'), max (a "
                        'small defect anywhere decides), avgmax (their mean)')
    g.add_argument('--finetune', default='', help='local checkpoint (or URL) to start from')
    g.add_argument('--model_key', default='model|model_ema|module|state_dict')
    g.add_argument('--model_ema', type=str2bool, default=False)
    g.add_argument('--model_ema_decay', type=float, default=0.9999)
    g.add_argument('--model_ema_eval', type=str2bool, default=False,
                   help='also validate the EMA weights each epoch; keep their best as checkpoint-best-ema.pth and '
                        'test it (metrics_ema.json)')


def add_roadmap_flags(p):
    """Flags of the ResNet-50 to ConvNeXt-T roadmap (Liu et al. 2022, figure 2; models/resnet_roadmap.py)."""
    g = p.add_argument_group('ResNet-to-ConvNeXt roadmap (--model resnet; defaults: ResNet-50; each step adds a flag)')
    g.add_argument('--resnet_layers', default='3-4-6-3', help='blocks per stage; 3-3-9-3 is the stage-ratio step')
    g.add_argument('--resnet_stem', default='resnet', choices=['resnet', 'patch_embed'],
                   help='7x7 conv + max-pool, or the 4x4 stride-4 patchify stem')
    g.add_argument('--resnet_depthwise', type=str2bool, default=False, help='depthwise spatial conv (ResNeXt-ify)')
    g.add_argument('--resnet_embed_dim', type=int, default=64, help='first-stage width (96 in ConvNeXt-T)')
    g.add_argument('--resnet_block', default='bottleneck', choices=['bottleneck', 'inverted'])
    g.add_argument('--resnet_conv_first', type=str2bool, default=False, help='spatial conv at the start of the block')
    g.add_argument('--resnet_kernel_size', type=int, default=3)
    g.add_argument('--resnet_act_layer', default='relu', choices=['relu', 'gelu'])
    g.add_argument('--resnet_del_act', type=str2bool, default=False, help='one activation per block')
    g.add_argument('--resnet_reorg_norm', type=str2bool, default=False, help='one norm per block')
    g.add_argument('--resnet_norm_layer', default='bn', choices=['bn', 'ln'])
    g.add_argument('--resnet_final_norm', type=str2bool, default=False, help='norm on the pooled features')
    g.add_argument('--resnet_sep_downsample', type=str2bool, default=False,
                   help='separate downsampling layers and layer scale: ConvNeXt-T with all the flags before')


def add_optimisation_flags(p):
    """Flags of the optimisation group."""
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=32, help='per process')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('--time_budget', type=float, default=None,
                   help='wall minutes for the whole run: after the first epoch its length is fixed to the whole '
                        'epochs that fit (at most --epochs), then shortened or lengthened as later epochs run slower '
                        'or faster; default: none')
    g.add_argument('--update_freq', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--opt_eps', type=float, default=1e-8)
    g.add_argument('--opt_betas', type=float, nargs='+', default=None)
    g.add_argument('--opt_fused', type=str2bool, default=True,
                   help="torch's fused step (one kernel for all parameters) where the optimizer has one: "
                        "Adam, AdamW, SGD")
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight_decay', type=float, default=0.05)
    g.add_argument('--clip_grad', type=float, default=None, help='max gradient norm')
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--layer_decay', type=float, default=None, help='layer-wise LR decay, e.g. 0.8')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--warmup_epochs', type=int, default=1)
    g.add_argument('--warmup_lr', type=float, default=1e-6)
    g.add_argument('--min_lr', type=float, default=1e-6)


def add_augmentation_flags(p):
    """Flags of the augmentation group."""
    g = p.add_argument_group('augmentation')
    g.add_argument('--normalize', default='per_image', choices=['per_image', 'imagenet'],
                   help='per_image: zero mean, unit variance per image; imagenet: ImageNet mean/std')
    g.add_argument('--clahe', type=float, default=0.0,
                   help='CLAHE clip limit (local contrast, e.g. 2; 0 = off), applied in training and evaluation')
    g.add_argument('--clahe_grid', type=int, default=8, help='CLAHE tiles per side')
    g.add_argument('--blackhat', type=int, default=0,
                   help='third input channel: morphological black-hat (thin dark lines) with a KERNEL-pixel ellipse, '
                        'e.g. 5; 0 = off; needs --in_chans 3')
    g.add_argument('--scale', type=float, nargs=2, default=[0.8, 1.0],
                   help="RandomResizedCrop area range (timm's ImageNet 0.08 1 shrinks thin defects out of sight)")
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.5, help='defect images have no up or down')
    g.add_argument('--rot90', type=float, default=0.0, help='probability of a random 90/180/270-degree turn')
    g.add_argument('--rotation', type=float, default=0.0, help='random rotation within +-DEG degrees')
    g.add_argument('--color_jitter', type=float, default=0.0)
    g.add_argument('--aa', default='none', help='RandAugment policy, e.g. rand-m9-mstd0.5-inc1; none to disable')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--crop_pct', type=float, default=1.0, help='evaluation centre-crop fraction')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha')
    g.add_argument('--cutmix_minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup_prob', type=float, default=1.0)
    g.add_argument('--mixup_switch_prob', type=float, default=0.5)
    g.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing on top of the soft targets')


def add_soft_label_flags(p):
    """Flags of the soft labels group."""
    g = p.add_argument_group('soft labels')
    g.add_argument('--use_softlabel', type=str2bool, default=False)
    g.add_argument('--soft_label_ratio', type=float, default=0.7, help='r: weight an ambiguous label keeps')
    g.add_argument('--label_ratio', type=float, default=1.0, help='q: weight a certain label keeps')
    g.add_argument('--soft_type', type=int, default=1, choices=[1, 2])
    g.add_argument('--lossfn', default='CE', choices=LOSS_FUNCTIONS)
    g.add_argument('--class_weight', default='none', choices=['none', 'balanced'],
                   help='balanced: per-label loss weights n / (4 n_label) from the training counts (shifts P(defect) '
                        'away from the data\'s prior, so it costs calibration)')


def add_data_flags(p):
    """Flags of the data group."""
    g = p.add_argument_group('data')
    g.add_argument('--data_path', nargs='+', default=None, help='prepared roots or split folders (union)')
    g.add_argument('--eval_data_path', default=None, help='data for --eval/--pred (default: first --data_path)')
    g.add_argument('--eval_split', default='test', choices=['train', 'val', 'test', 'all'])
    g.add_argument('--test_val_ratio', type=float, nargs=2, default=[0.2, 0.1], metavar=('TEST', 'VAL'))
    g.add_argument('--label_list', nargs='*', default=None, help='map folder names to labels: crack=pos ok=neg')
    g.add_argument('--upsample', type=float, nargs=4, default=None, metavar=('AMB_NEG', 'AMB_POS', 'NEG', 'POS'))
    g.add_argument('--use_bbox', type=str2bool, default=False)
    g.add_argument('--padding', default='PIXEL', choices=PADDING_MODES)
    g.add_argument('--padding_size', type=float, default=0, help='pixels (rounded to whole pixels)')
    g.add_argument('--use_shift', type=str2bool, default=False, help='random crop shift at train time')
    g.add_argument('--strict_images', type=str2bool, default=False, help='stop on a corrupt image')
    g.add_argument('--num_workers', type=int, default=-1,
                   help='DataLoader workers per process; -1: cores per process minus one (at most 8), or none '
                        'where a timed probe of training on a CPU finds that faster (workers.py)')
    g.add_argument('--pin_mem', type=str2bool, default=True, help='pinned memory (CUDA only)')
    g.add_argument('--cache', default='auto', choices=['auto', 'memory', 'file', 'none'],
                   help='decode and resize images once: memory, file (memory plus a file beside the split), '
                        'none; auto = file when the images fit in a quarter of the free memory')


def add_run_flags(p):
    """Flags of the run group."""
    g = p.add_argument_group('run')
    g.add_argument('--config', default=None,
                   help='YAML run config: flag names to values, read as defaults (the command line wins); each run '
                        'saves its effective flags as OUTPUT/config.yaml')
    g.add_argument('--output_dir', default='output')
    g.add_argument('--log_dir', default=None, help='TensorBoard root (default: --output_dir)')
    g.add_argument('--log_name', default='tensorboard')
    g.add_argument('--enable_wandb', type=str2bool, default=False,
                   help='also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)')
    g.add_argument('--project', default='convnext-softlabel', help='W&B project')
    g.add_argument('--wandb_ckpt', type=str2bool, default=False,
                   help='upload checkpoint-best.pth (each new best) and checkpoint-last.pth (at the end) to W&B')
    g.add_argument('--best_metric', default='auroc',
                   help='validation metric choosing checkpoint-best.pth (auroc, acc, f1, ap, ece, brier...), or last: '
                        'the last epoch, no selection on validation')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--seed', type=int, default=0, help='training seed (and split seed unless --split_seed)')
    g.add_argument('--split_seed', type=int, default=None, help='seed of the train/val/test split (default --seed)')
    g.add_argument('--resume', nargs='+', default=None, help='checkpoint(s): continue training, or --eval/--pred')
    g.add_argument('--auto_resume', type=str2bool, default=False, help='continue from OUTPUT/checkpoint-last.pth')
    g.add_argument('--use_amp', type=str2bool_or_auto, default='auto',
                   help='bf16 autocast on CPU, bf16 (fp16 where unsupported) on CUDA; auto: measured per machine')
    g.add_argument('--amp_dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    g.add_argument('--channels_last', type=str2bool_or_auto, default='auto',
                   help='NHWC memory format; auto: measured per machine with --use_amp')
    g.add_argument('--depthwise_fp32', type=str2bool_or_auto, default='auto',
                   help='with --use_amp: the depthwise convolutions in fp32 channels_last outside autocast (their '
                        'bf16 backward is slow on some CPUs); auto: measured per machine with --use_amp')
    g.add_argument('--depthwise_wgrad', default='forward_conv', choices=WGRAD_CHOICES,
                   help='weight gradient of the depthwise convolutions when training on a CPU: forward_conv computes '
                        'it with the fast forward kernel, per sample (models.depthwise); native: PyTorch\'s backward')
    g.add_argument('--reuse_freed_memory', type=str2bool, default=True,
                   help='glibc malloc keeps freed blocks up to 32 MiB for reuse instead of returning them to the '
                        'system, so each step reuses the last step\'s activation memory (no page faults)')
    g.add_argument('--compile', type=str2bool_or_auto, default='auto',
                   help='torch.compile the model (eager on failure); auto: when compile time + the run\'s steps '
                        'compiled beat the steps eager, timed once per machine (precision.choose_compile)')
    g.add_argument('--early_stop', type=str2bool, default=False)
    g.add_argument('--early_stop_epoch', type=int, default=10, help='epochs without improvement before stopping')
    g.add_argument('--eval', type=str2bool, default=False, help='evaluate --resume on --eval_data_path')
    g.add_argument('--test', type=str2bool, default=True, help='evaluate the best checkpoint on test after training')


def add_operating_point_flags(p):
    """Flags of the operating point, fitted on the validation split after training."""
    g = p.add_argument_group('operating point (fitted on validation after training, stored in checkpoint-best.pth)')
    g.add_argument('--target_recall', type=float, default=None,
                   help='pick the P(defect) threshold reaching this defect recall with the best precision')
    g.add_argument('--calibrate', type=str2bool, default=False,
                   help='temperature scaling of the probabilities (Guo et al. 2017)')


def add_fcmae_flags(p):
    """Flags of the FCMAE pretraining (ConvNeXt V2, Woo et al. 2023) group."""
    g = p.add_argument_group('FCMAE pretraining (ConvNeXt V2, Woo et al. 2023)')
    g.add_argument('--pretrain', type=str2bool, default=False,
                   help='self-supervised FCMAE pretraining of --model (a convnextv2_* name) on the images')
    g.add_argument('--mask_ratio', type=float, default=0.6, help='fraction of 32x32 patches masked')
    g.add_argument('--decoder_depth', type=int, default=1)
    g.add_argument('--decoder_embed_dim', type=int, default=512)
    g.add_argument('--norm_pix_loss', type=str2bool, default=True, help='normalise each target patch')


def add_prediction_flags(p):
    """Flags of the prediction group."""
    g = p.add_argument_group('prediction')
    g.add_argument('--pred', type=str2bool, default=False, help='prediction mode')
    g.add_argument('--pred_save_path', default=None, help='prediction output folder')
    g.add_argument('--pred_save', type=str2bool, default=False, help='copy images sorted by true/predicted label')
    g.add_argument('--pred_save_with_conf', type=str2bool, default=False, help='prefix copies with P(defect)')
    g.add_argument('--pred_eval', type=str2bool, default=False, help='draw evaluation graphs')
    g.add_argument('--pred_eval_name', default='', help='prefix of the graph file names')
    g.add_argument('--pred_cam', type=str2bool, default=False,
                   help='Grad-CAM overlay of P(defect) per image under the report\'s cam/ (as images/ sorts them)')
    g.add_argument('--conf', type=float, default=0.5,
                   help='decision threshold on P(defect); --eval/--pred use the checkpoint\'s --target_recall '
                        'threshold unless --conf is given')
    g.add_argument('--several_models', type=str2bool, default=False, help='average the --resume checkpoints')
    g.add_argument('--tta', type=str2bool, default=False,
                   help='test-time augmentation (test split, --eval, --pred): average over the 8 flips and turns, '
                        'or the 4 flips for a model trained with --rot90 0')


def get_args_parser():
    """All command-line flags of main.py (boolean flags take True/False), in argument groups."""
    p = argparse.ArgumentParser('ConvNeXt soft-label defect classifier', allow_abbrev=False)
    for add in (add_model_flags, add_roadmap_flags, add_optimisation_flags, add_augmentation_flags,
                add_soft_label_flags, add_data_flags, add_run_flags, add_operating_point_flags, add_fcmae_flags,
                add_prediction_flags):
        add(p)
    return p


def check_args(args):
    """Validate flag values; raises DataError with a one-line message naming the flag."""
    try:
        for name in ('soft_label_ratio', 'label_ratio', 'conf'):
            check_ratio(name, getattr(args, name))
        head_classes(args.nb_classes)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not 0 <= args.smoothing < 1:
        raise DataError(f'--smoothing must lie in [0, 1), got {args.smoothing}')
    optimizer_class(args.opt)
    if args.batch_size < 1 or args.epochs < 0 or args.update_freq < 1:
        raise DataError('--batch_size and --update_freq must be >= 1 and --epochs >= 0')
    if args.time_budget is not None and not args.time_budget > 0:
        raise DataError(f'--time_budget must be > 0 minutes, got {args.time_budget}')
    if args.model_ema_eval and not args.model_ema:
        raise DataError('--model_ema_eval True needs --model_ema True (there are no EMA weights to validate)')
    if not 0 < args.model_ema_decay < 1:
        raise DataError(f'--model_ema_decay must lie in (0, 1), got {args.model_ema_decay}')
    if not 0 <= args.mask_ratio < 1:
        raise DataError(f'--mask_ratio must lie in [0, 1), got {args.mask_ratio}')
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise DataError(f'--target_recall must lie in (0, 1], got {args.target_recall}')
    if not args.padding_size >= 0:
        raise DataError(f'--padding_size must be >= 0 pixels, got {args.padding_size}')
    check_input_size(args.input_size)
    if args.blackhat and (args.blackhat < 3 or args.in_chans != 3):
        raise DataError(f'--blackhat must be 0 (off) or >= 3 pixels with --in_chans 3, got {args.blackhat} '
                        f'with --in_chans {args.in_chans}')
    if args.best_metric != 'last':
        try:
            check_metric_name(args.best_metric)
        except ValueError as e:
            raise DataError(f'--best_metric: {e}, or last') from None
    parse_label_list(args.label_list)
    if args.enable_wandb and importlib.util.find_spec('wandb') is None:
        raise DataError('--enable_wandb True needs the wandb package: pip install wandb')
    if check_norm_layer(args.model, args.norm_layer) == 'batchnorm' and args.pretrain:
        raise DataError('--norm_layer batchnorm: not for FCMAE pretraining (its masked encoder keeps LayerNorm)')
    if args.model == 'resnet':
        try:
            resnet_roadmap.options_from_args(args)
        except ValueError as e:
            raise DataError(str(e)) from None
