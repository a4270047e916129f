"""Data parallelism on torch.distributed: one process per device, all started by torchrun.

    torchrun --standalone --nproc_per_node N train.py --config X

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process's environment; without them
(plain `python train.py`) there is one process, and every helper here is a no-op, so a single
process trains exactly as it would without this module.

Each rank holds the whole model (the 4-bit base loaded on its own device) and trains on its own
slice of every micro-batch (see steps.TrainSteps). DistributedDataParallel wraps the model for the
training forward, but only the adapters are its business: the frozen base is neither broadcast
nor reduced (`wrap`). DDP adds the ranks' adapter gradients during the backward of each step's
last micro-batch (`synchronising`), so every rank then holds the gradient of the whole global
step and takes the same optimizer step, and the adapters stay identical across ranks.

Evaluation is split too: each rank answers its share of the eval rows (`shard`), and the
answers are gathered (`gather`) so that every rank scores the whole split alike.

With train.fsdp, for a base that no single GPU holds, `wrap` shards instead of replicating:
FullyShardedDataParallel (FSDP1) splits each transformer layer's weights across the ranks and
gathers one layer at a time for its forward and backward. Only the layers are sharded; the
adapters stay whole on every rank (FSDP ignores them; `sum_gradients` adds their gradients by
hand), and so do the embeddings, lm_head, norms outside the layers and the projector. Why FSDP1:
its flat parameters hold the 4-bit codes as plain bytes of the model's float dtype (quant.py,
`quant_storage`), the approach bitsandbytes, PEFT and Answer.AI's FSDP-QLoRA document; FSDP2's
per-parameter DTensors turn bf16-packed codes that happen to spell a NaN into the canonical NaN,
silently changing weights (bitsandbytes issue #1945, open as of 2026-11). This path has run on
CPUs only (tests/test_distributed.py); on GPUs it is unverified.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel


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


def totals(values: list[float], device: torch.device) -> list[float]:
    """Each of `values` summed over all ranks, in one all-reduce (float64: exact for counts below
    2**53); unchanged alone."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def total(value: float, device: torch.device) -> float:
    """`value` summed over all ranks; see totals."""
    return totals([value], device)[0]


def _sum_not_mean(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    """DDP's all-reduce of one bucket of gradients (a dist.GradBucket), without the division by
    the world size."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda done: done.value()[0])


def wrap(model: torch.nn.Module, device: torch.device, shard: bool = False) -> torch.nn.Module:
    """`model` in DistributedDataParallel for training (FullyShardedDataParallel if `shard`), or
    itself alone.

    Only what trains is DDP's: the frozen weights and the buffers are left out of the broadcast
    of rank 0's weights at start (every rank loaded the same base; broadcasting a 4-bit model's
    packed weights would only cost time) and out of every later sync. What is left, the adapters,
    starts from rank 0's, and their gradients are all-reduced in buckets while the backward is
    still running.

    Summed, not averaged as DDP does: each rank's loss is already divided by the answer tokens of
    the whole global step (the objective's backward_window), so the sum is the gradient of the global
    per-token mean. `find_unused_parameters=False`: every adapter takes part in every forward,
    so DDP need not walk the graph looking for ones that did not. Activation checkpointing must
    be the non-reentrant kind (build.py), which DDP's hooks see through.
    """
    if world_size() == 1:
        return model
    if shard:
        return _shard(model, device)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [name for name, _ in model.named_buffers()])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=False, forward_sync_buffers=False)
    ddp.register_comm_hook(None, _sum_not_mean)
    return ddp


def layer_class_names(model: torch.nn.Module) -> set[str]:
    """The transformer layer classes of `model` and its parts (LLaVA-Phi: Phi-2's and CLIP's):
    what transformers lists in `_no_split_modules`, the units accelerate's FSDP auto wrap uses."""
    return {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def _shard(model: torch.nn.Module, device: torch.device) -> FullyShardedDataParallel:
    """FSDP units = the model's transformer layers (the classes transformers lists in
    `_no_split_modules`, as accelerate's auto wrap does); whatever trains or lies outside them is
    left whole on every rank (`ignored_states`)."""
    names = layer_class_names(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"train.fsdp: {type(model).__name__} names no transformer layer classes "
                         "(_no_split_modules) to shard; set train.fsdp = false")
    inside = {id(p) for layer in layers for p in layer.parameters()}
    whole = [p for p in model.parameters() if p.requires_grad or id(p) not in inside]
    # use_orig_params: a layer's frozen weights and (ignored) adapters keep their own names and
    # tensors, so the optimizer, clipping and checkpoints see the adapters as without FSDP.
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(m) for m in layers}),
                                    ignored_states=whole, use_orig_params=True, device_id=device)


def is_sharded(model: torch.nn.Module) -> bool:
    """Some layer of `model` is FSDP-sharded: then every rank must run every forward, in step
    (each one gathers the layer's weights from all ranks)."""
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def sum_gradients(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Under FSDP, replace each adapter's .grad by its sum over the ranks, in one all-reduce (FSDP
    ignores the adapters; DDP has already summed them during the backward). A sum for the same
    reason as `_sum_not_mean`; a rank without a gradient adds zeros."""
    if not isinstance(model, FullyShardedDataParallel):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p).to(p.dtype, copy=True)


def unwrapped_name(name: str) -> str:
    """A parameter's name as without FSDP, which inserts its wrapper into the path of every
    parameter of a sharded layer."""
    return name.replace("_fsdp_wrapped_module.", "")


def synchronising(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: DDP's gradient all-reduce happens in the
    window's `last` one only, the others accumulate in .grad on each rank (`no_sync`). So a step
    communicates once, however many micro-batches it accumulates."""
    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def shard(n: int, model: torch.nn.Module) -> range:
    """This rank's contiguous share of n rows (the shares, in rank order, are range(n)); all n if
    `model` is sharded, since every rank then runs every forward (see is_sharded)."""
    if is_sharded(model):
        return range(n)
    return range(rank() * n // world_size(), (rank() + 1) * n // world_size())


def gather(items: list, model: torch.nn.Module) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank; `items` alone,
    or if `model` is sharded (every rank then holds them all: see shard)."""
    if world_size() == 1 or is_sharded(model):
        return items
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, items)
    return [item for share in everyone for item in share]


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint); no-op alone."""
    if world_size() > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group at the end of a run (torch warns if a process exits without)."""
    if dist.is_initialized():
        dist.destroy_process_group()
