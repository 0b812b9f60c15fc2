"""A run's own records: its flags (args.json, and config.yaml for ``--config``), one JSON line per epoch (log.txt),
TensorBoard scalars and, with ``--enable_wandb True``, the same scalars in Weights & Biases."""
import json
import math
from pathlib import Path

from config import write_config
from distributed import is_main_process
from utils import DataError, atomic_write_json


def start_wandb(args, out):
    """Start a Weights & Biases run with the run's flags as its config (``--enable_wandb``, ``--project``).

    The run id is derived from the output folder, so a resumed training continues the same W&B run. ``WANDB_MODE``
    (e.g. ``offline``) and the other ``WANDB_*`` variables apply as usual.

    Returns:
        the ``wandb`` run.
    Raises:
        DataError: wandb is not installed (it is optional: ``pip install wandb``).
    """
    try:
        import wandb
    except ImportError:
        raise DataError('--enable_wandb True needs the wandb package: pip install wandb') from None
    import hashlib
    run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    run = wandb.init(project=args.project, config=vars(args), name=out.name, id=run_id, resume='allow',
                     dir=str(out))
    run.define_metric('epoch')
    run.define_metric('global_step')
    for tag in ('train/epoch_loss', 'val/*', 'pretrain/epoch_loss'):
        run.define_metric(tag, step_metric='epoch')
    for tag in ('train/loss', 'train/lr', 'pretrain/loss', 'pretrain/lr'):
        run.define_metric(tag, step_metric='global_step')
    return run


class RunLog:
    """Writes a run's records into ``--output_dir``, the TensorBoard folder ``--log_dir/--log_name`` and W&B.

    args.json goes into both folders (load_board.py reads it beside the events); config.yaml, the same flags as a run
    config that ``python main.py --config`` accepts again, into ``--output_dir``. Only the main process writes; in
    the other processes of a torchrun job every method does nothing, so a loop calls them unconditionally.
    The training loops log per-step scalars through ``add_scalar`` (the SummaryWriter's signature).

    Args:
        args: argparse.Namespace of the run (saved as args.json); ``enable_wandb``, ``project`` and ``wandb_ckpt``
            switch W&B on.
        start_epoch: int, the epoch a resumed run starts at; TensorBoard events from step
            ``start_epoch * steps_per_epoch`` on are purged (they came after the checkpoint).
        steps_per_epoch: int, the per-step scalars' steps in one epoch.
    Raises:
        DataError: --enable_wandb without the wandb package.
    """

    def __init__(self, args, start_epoch=0, steps_per_epoch=1):
        self.out = Path(args.output_dir)
        self.writer = self.wandb = None
        self.wandb_ckpt = False
        if not is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter
        tb_dir = Path(args.log_dir or args.output_dir) / args.log_name
        for folder in (self.out, tb_dir):
            atomic_write_json(vars(args), folder / 'args.json')
        write_config(args, self.out / 'config.yaml')
        if getattr(args, 'enable_wandb', False):
            self.wandb = start_wandb(args, self.out)
            self.wandb_ckpt = bool(getattr(args, 'wandb_ckpt', False))
        self.writer = SummaryWriter(log_dir=str(tb_dir),
                                    purge_step=start_epoch * steps_per_epoch if start_epoch else None)

    def add_scalar(self, tag, value, step):
        """Log a per-step scalar (float) at global step ``step`` (int) to TensorBoard and W&B."""
        if self.writer is None:
            return
        self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value, 'global_step': step})

    def epoch(self, record, scalars):
        """Log one finished epoch.

        Args:
            record: dict with 'epoch' (int) and JSON-serialisable values, appended to log.txt as one line.
            scalars: dict TensorBoard tag -> float, written at step ``record['epoch']`` (non-finite ones skipped).
        """
        if self.writer is None:
            return
        finite = {t: v for t, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for tag, value in finite.items():
            self.writer.add_scalar(tag, value, record['epoch'])
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({**finite, 'epoch': record['epoch']})
        with open(self.out / 'log.txt', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def checkpoint(self, path, aliases):
        """With ``--wandb_ckpt True``, upload a checkpoint file as a W&B model artifact with ``aliases`` (list)."""
        if self.wandb is None or not self.wandb_ckpt:
            return
        import re

        import wandb
        artifact = wandb.Artifact(re.sub(r'[^A-Za-z0-9._-]+', '-', self.out.name) + '-model', type='model')
        artifact.add_file(str(path))
        self.wandb.log_artifact(artifact, aliases=list(aliases))

    def close(self):
        """Flush and close the TensorBoard writer and finish the W&B run."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
