"""Data parallelism on torch.distributed: one process per device, all started by torchrun.

    torchrun --standalone --nproc_per_node N train.py --config X

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process's environment; without them
(plain `python train.py`) there is one process, and every helper here is a no-op, so a single
process trains exactly as it would without this module.

Each rank holds the whole model and trains on its own slice of every micro-batch (see
data.TrainSteps). After a step's micro-batches, `sum_gradients` adds the ranks' adapter
gradients: every rank then holds the gradient of the whole global step and takes the same
optimizer step, so the adapters stay identical across ranks without ever being broadcast.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Join the process group if torchrun started several processes: NCCL between GPUs, gloo on CPUs."""
    if launched() and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, plots and metrics."""
    return rank() == 0


def total(value: float, device: torch.device) -> float:
    """`value` summed over all ranks (float64: exact for counts below 2**53); unchanged alone."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's .grad by its sum over the ranks, in one all-reduce.

    A sum, not DDP's mean: each rank's loss is already divided by the answer tokens of the whole
    global step (loop.backward_window), so the sum is the gradient of the global per-token mean.
    Done by hand once per optimizer step rather than by wrapping the model in
    DistributedDataParallel: DDP's hooks need every rank to run a forward and backward for each
    synchronised micro-batch, and at the end of an epoch a rank's slice of the last micro-batch
    can be empty (or hold no answer tokens). DDP with no_sync communicates the same bytes once
    per step; what it adds is overlapping that communication with the backward, which adapters of
    a few million parameters hardly need. A rank without a gradient adds zeros.
    """
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p).to(p.dtype, copy=True)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint); no-op alone."""
    if world_size() > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group at the end of a run (torch warns if a process exits without)."""
    if dist.is_initialized():
        dist.destroy_process_group()
