"""Multi-process helpers for ``torchrun``: process-group setup, rank checks, sharded evaluation, gathering.

    torchrun --nproc_per_node 2 main.py --data_path data/elpv ...          # one machine, 2 processes
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint HOST:29500 --nproc_per_node 8 main.py ...

Backend: NCCL on CUDA, gloo on CPU (``torch.distributed``). Without torchrun's environment everything here is a
no-op for a single process.
"""
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def init_distributed(device_name='auto'):
    """Join the process group when started by torchrun (RANK and WORLD_SIZE set), else do nothing.

    Args:
        device_name: --device; 'auto' picks cuda:LOCAL_RANK when CUDA is available, else CPU.

    Returns:
        (torch.device for this process, rank, world_size).
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = torch.cuda.is_available() and device_name in ('auto', 'cuda') or device_name.startswith('cuda:')
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    if use_cuda:
        return torch.device('cuda', local if world > 1 else torch.cuda.current_device()), rank, world
    return torch.device('cpu'), rank, world


def is_distributed():
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process():
    """True on rank 0: the only process that writes checkpoints, logs, CSVs, images and graphs."""
    return rank() == 0


def world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def main_first(fn):
    """Call ``fn`` on rank 0 first, then on the other ranks (e.g. rank 0 writes a split or cache file that the others
    then read); returns ``fn()``'s result on every rank."""
    if is_main_process():
        try:
            return fn()
        finally:  # also on error: the other ranks then meet the same error themselves instead of waiting forever
            barrier()
    barrier()
    return fn()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process (``torch.distributed.broadcast_object_list``); ``obj`` itself without a
    process group. Only for small picklable values that this program made (never data read from files)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    """Wait for every process (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def cleanup():
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r + W, r + 2W, ... of the dataset, in order, without the padding
    duplicates of ``DistributedSampler`` (so gathered metrics count every sample exactly once)."""

    def __init__(self, dataset, num_replicas=None, rank_=None):
        self.n = len(dataset)
        self.num_replicas = num_replicas if num_replicas is not None else (
            dist.get_world_size() if is_distributed() else 1)
        self.rank = rank_ if rank_ is not None else rank()

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))


def gather_predictions(probs, indices):
    """Gather every process's predictions and order them by sample index.

    Args:
        probs: float array [n_rank, C]. indices: int64 array [n_rank].

    Returns:
        (float array [N, C], int64 array [N]) with N the sum over ranks, sorted by index; unchanged for one process.
    """
    if not is_distributed():
        return probs, indices
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (probs, indices))
    probs = np.concatenate([p for p, _ in parts if len(p)]) if any(len(p) for p, _ in parts) else probs
    indices = np.concatenate([i for _, i in parts])
    order = np.argsort(indices, kind='stable')
    return probs[order], indices[order]


def all_reduce_sum(value):
    """Sum of a Python number over all processes (the number itself for one process)."""
    if not is_distributed():
        return value
    device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()
