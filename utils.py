"""Small helpers shared by the entry points: errors, flag parsing, atomic writes, seeding."""
import argparse
import contextlib
import errno
import json
import logging
import math
import os
import sys
import random
import re
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class DataError(Exception):
    """Bad user input (data, flags, checkpoints); the entry points print its one-line message and exit 1."""


class TrainingDiverged(DataError):
    """The loss became NaN or infinite; the message names the epoch, step and learning rate, with a hint."""


def check_finite_loss(value, epoch, step, lr, what='loss'):
    """Return ``value`` if it is finite.

    Raises:
        TrainingDiverged: one line naming the epoch, step and learning rate; checkpoint-last.pth (written only after
            a finished epoch) still holds the last good epoch.
    """
    if not math.isfinite(value):
        raise TrainingDiverged(f'{what} is {value} at epoch {epoch}, step {step} (learning rate {lr:.3g}); lower --lr '
                               f'or set --clip_grad; checkpoint-last.pth holds the last finished epoch')
    return value


def str2bool(value):
    """Parse a True/False command-line value (also yes/no, 1/0, any case).

    Raises:
        argparse.ArgumentTypeError: any other value.
    """
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ('true', 'yes', '1', 'y', 't'):
        return True
    if v in ('false', 'no', '0', 'n', 'f'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got "{value}"')


def str2bool_or_auto(value):
    """Parse True/False like ``str2bool``, or 'auto' (any case) for a choice the program makes by measuring.

    Raises:
        argparse.ArgumentTypeError: any other value.
    """
    if str(value).strip().lower() == 'auto':
        return 'auto'
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected True, False or auto, got "{value}"') from None


TMP_NAME = re.compile(r'\..+\.[a-z0-9_]{8}\.tmp')  # atomic_write's temporary files: .NAME.XXXXXXXX.tmp


def atomic_write(path, write, mode='w'):
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    The one atomic-write rule of the project: a reader never sees a half-written file, and on any failure (an
    exception from ``write``, a full disk) the temporary file is removed and an earlier ``path`` is left intact.

    Args:
        path: destination file (its folder is created).
        write: callable taking the open file object.
        mode: 'w' (text) or 'wb' (binary).

    Raises:
        DataError: a full disk, an exceeded quota or a read-only or forbidden folder (one line naming the file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        text = {} if 'b' in mode else {'encoding': 'utf-8', 'errors': 'surrogateescape'}  # any file name round-trips
        with os.fdopen(fd, mode, **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise DataError(f'{path}: cannot write ({e.strerror}); the previous version of the file is intact') \
                from None
        raise


def read_csv(path, what='table', **kwargs):
    """Read a CSV file with pandas; file names that are not UTF-8 come back as written (surrogate escapes).

    Args:
        path: str or Path. what: the file's role in an error message. kwargs: passed to ``pandas.read_csv``.
    Returns:
        pandas.DataFrame.
    Raises:
        DataError: a missing, unreadable or malformed file, or a requested column it lacks (one line naming it).
    """
    import pandas as pd
    try:
        return pd.read_csv(path, encoding_errors='surrogateescape', **kwargs)
    except FileNotFoundError:
        raise DataError(f'{path}: no such {what}') from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise DataError(f'{path}: unreadable {what} ({reason})') from None


def atomic_write_csv(df, path):
    """Write a pandas DataFrame to CSV atomically (temporary file, then rename); no index column."""
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def atomic_write_json(obj, path):
    """Write a JSON-serialisable object atomically, indented."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def atomic_write_text(text, path):
    """Write a string to a file atomically."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(data, path):
    """Write bytes to a file atomically."""
    atomic_write(path, lambda f: f.write(data), mode='wb')


def atomic_torch_save(obj, path):
    """``torch.save`` atomically: a crash mid-write never leaves a truncated checkpoint at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), mode='wb')


def remove_stale_temporaries(folder):
    """Delete the temporary files ``atomic_write`` left below ``folder`` when its writer was killed (kill -9).

    Only call it while holding the folder's lock: then no other process is writing one. Returns the number removed.
    """
    stale = [p for p in Path(folder).rglob('.*.tmp') if p.is_file() and TMP_NAME.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logging.getLogger('utils').info(f'removed {len(stale)} temporary file(s) of an interrupted writer in {folder}')
    return len(stale)


@contextlib.contextmanager
def folder_lock(folder, what='this folder'):
    """Hold an exclusive lock on a folder while a process writes into it: one writer per folder.

    The lock is an OS file lock (``filelock.FileLock`` on ``FOLDER/.lock``), which the operating system releases
    when the process ends in any way, kill -9 included, so a stale lock never blocks a later run. The holder's pid,
    command line and start time go into ``FOLDER/.lock.owner`` for the message another process gets. Under torchrun
    only rank 0 (environment RANK) locks: the other ranks write nothing.

    Args:
        folder: the folder (created; removed again when the lock created it and nothing else was written into it).
        what: words for the message, e.g. 'the run folder'.

    Raises:
        DataError: another process holds the folder (one line naming it).
    """
    from filelock import FileLock, Timeout
    if os.environ.get('RANK', '0') != '0':
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / '.lock'), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads((folder / '.lock.owner').read_text())
            holder = f'pid {owner["pid"]}, started {owner["since"]}: {owner["command"][:200]}'
        except (OSError, ValueError, KeyError, TypeError):
            holder = 'holder unknown'
        raise DataError(f'{folder}: {what} is in use by another process ({holder}); wait for it to end or choose '
                        f'another folder') from None
    try:
        atomic_write_json({'pid': os.getpid(), 'command': ' '.join(sys.argv),
                           'since': time.strftime('%Y-%m-%d %H:%M:%S')}, folder / '.lock.owner')
        remove_stale_temporaries(folder)
        yield
    finally:
        (folder / '.lock.owner').unlink(missing_ok=True)
        lock.release()
        lock_files = {'.lock', '.lock.owner'}
        if created and {p.name for p in folder.iterdir()} <= lock_files:  # a start that failed leaves no folder
            for name in lock_files:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def seed_everything(seed):
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA) with an int seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Snapshot of the Python, NumPy and torch (CPU and CUDA) RNG states, for checkpoints.

    Everything in it is a type that ``torch.load(weights_only=True)`` accepts: NumPy's key array (uint32 [624])
    travels as an int64 tensor.

    Returns:
        dict 'python', 'numpy', 'torch' (uint8 tensor) and, where CUDA is available, 'cuda' (list of uint8 tensors).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore a snapshot taken by ``rng_state`` (read back from a checkpoint); missing entries are left alone."""
    if 'python' in state:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
    if 'numpy' in state:
        name, keys, pos, has_gauss, cached = state['numpy']
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and most schedulers send before they stop a job), raised where the program runs so that it
    unwinds like Ctrl-C: files are closed and checkpoint-last.pth keeps the last finished epoch."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main, interrupt_message=None):
    """Run an entry point's ``main()`` with INFO logging; a DataError exits with its one-line message (status 1),
    Ctrl-C (status 130) and SIGTERM (status 143) with ``interrupt_message``."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
    except DataError as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt as e:
        if interrupt_message:
            print(interrupt_message, file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
