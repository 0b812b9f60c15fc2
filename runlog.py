"""A run's own records: its flags (args.json), one JSON line per epoch (log.txt) and TensorBoard scalars."""
import json
import math
from pathlib import Path

from distributed import is_main_process
from utils import atomic_write_json


class RunLog:
    """Writes a run's records into ``--output_dir`` and the TensorBoard folder ``--log_dir/--log_name``.

    args.json goes into both folders (load_board.py reads it beside the events). Only the main process writes; in
    the other processes of a torchrun job every method does nothing, so a loop calls them unconditionally.

    Args:
        args: argparse.Namespace of the run (saved as args.json).
        start_epoch: int, the epoch a resumed run starts at; TensorBoard events from step
            ``start_epoch * steps_per_epoch`` on are purged (they came after the checkpoint).
        steps_per_epoch: int, the per-step scalars' steps in one epoch.
    """

    def __init__(self, args, start_epoch=0, steps_per_epoch=1):
        self.out = Path(args.output_dir)
        self.writer = None
        if not is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter
        tb_dir = Path(args.log_dir or args.output_dir) / args.log_name
        for folder in (self.out, tb_dir):
            atomic_write_json(vars(args), folder / 'args.json')
        self.writer = SummaryWriter(log_dir=str(tb_dir),
                                    purge_step=start_epoch * steps_per_epoch if start_epoch else None)

    def epoch(self, record, scalars):
        """Log one finished epoch.

        Args:
            record: dict with 'epoch' (int) and JSON-serialisable values, appended to log.txt as one line.
            scalars: dict TensorBoard tag -> float, written at step ``record['epoch']`` (non-finite ones skipped).
        """
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, record['epoch'])
        self.writer.flush()
        with open(self.out / 'log.txt', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def close(self):
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
