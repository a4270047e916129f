"""Which samples each optimizer step trains on, and how many steps a run has.

An epoch is a shuffle of the training split, a pure function of (seed, epoch); a step is
`grad_accum` micro-batches of it, and under torchrun each micro-batch is world_size × batch_size
samples, of which each rank takes its slice. So any step can be rebuilt from its number alone:
a resumed run starts at its step, and DataLoader workers can prepare steps in any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import datasets
import torch

from minivlm.batches import collate
from minivlm.config import DataConfig, TrainConfig
from minivlm.data import skipped_count, skipped_since
from minivlm.models import get_family


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch; a function of (seed, epoch) only, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)


def total_steps(t: TrainConfig, n_rows: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: train.max_steps, or train.epochs epochs of `n_rows` rows, each step
    taking world_size × batch_size samples per micro-batch."""
    return t.max_steps or steps_per_epoch(n_rows, t.batch_size * world_size, t.grad_accum) * t.epochs


class TrainSteps(torch.utils.data.Dataset):
    """Item k: the sample indices and collated micro-batches of optimizer step `first + k`.

    Addressed by step, not iterated: which samples a step trains on is epoch_batches(seed, epoch),
    a pure function of the step. So DataLoader workers can prepare any step in any process, in
    the order the loop asks for, and a resumed run simply starts at its step. Random crops draw
    from a generator seeded by (seed, step) for the same reason: a worker's global RNG is not the
    trainer's, and the crops must not depend on how many workers there are.

    With `world_size` data-parallel ranks, a micro-batch of the step is world_size × batch_size
    samples, of which rank r collates the r-th batch_size: N ranks × batch b then train on the
    same samples in the same steps as one process with batch N·b, and the split is still a pure
    function of (seed, epoch, world size, step). The window returned holds the whole micro-batches
    (all ranks' samples); the collated batches, this rank's slices only, one per micro-batch even
    where the slice is empty (at an epoch's short end): a batch of zero rows, so that every rank
    counts the same micro-batches (see objectives/sft.py:backward_window). Random crops are drawn per rank, so
    with data.random_resized_crop they are not those of the one-process run.
    """

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, family: str, processor, batch_size: int,
                 grad_accum: int, seed: int, first: int, last: int, world_size: int = 1, rank: int = 0,
                 collate_fn: Callable | None = None):
        self.ds, self.cfg, self.family, self.processor = ds, cfg, family, processor
        self.collate = collate_fn or collate  # dpo.collate_pairs for preference pairs
        self.batch_size, self.grad_accum, self.seed, self.first, self.last = batch_size, grad_accum, seed, first, last
        self.world_size, self.rank = world_size, rank
        self.per_epoch = steps_per_epoch(len(ds), batch_size * world_size, grad_accum)
        self._order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches): one shuffle per epoch

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, k: int) -> tuple[int, list[list[int]], list[dict[str, torch.Tensor]], dict]:
        """(step, its sample indices, its micro-batches, the bad rows first skipped in making them:
        a DataLoader worker's skips reach the training process this way, to be counted there)."""
        step = self.first + k
        epoch, offset = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches(len(self.ds), self.batch_size * self.world_size, self.seed, epoch))
        window = self._order[1][offset * self.grad_accum:(offset + 1) * self.grad_accum]
        mine = [idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for idx in window]
        crops = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        family = get_family(self.family)  # held by name: a module object does not pickle into workers
        mark = skipped_count()
        batches = [self.collate(self.ds, idx, self.cfg, family, self.processor, crops) for idx in mine]
        return step, window, batches, skipped_since(mark)


def filler_batch(ds: datasets.Dataset, cfg: DataConfig, family: ModuleType, processor) -> dict[str, torch.Tensor]:
    """The first usable sample of `ds` with every label masked: a forward and backward that add
    exactly zero to every gradient. Under DDP, a rank whose slice of a micro-batch holds no usable
    sample runs it instead, because every rank must take part in each synchronised backward."""
    for i in range(len(ds)):
        batch = collate(ds, [i], cfg, family, processor)
        if len(batch["input_ids"]):
            return {**batch, "labels": torch.full_like(batch["labels"], -100)}
    raise ValueError("the training split has no usable sample (see data.on_bad_sample and data.max_length)")


def train_loader(ds: datasets.Dataset, cfg: DataConfig, family: str, processor, batch_size: int, grad_accum: int,
                 seed: int, first: int, last: int, world_size: int = 1, rank: int = 0,
                 collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """Steps first..last-1 in order, each (step, sample indices, micro-batches), collated by
    `collate_fn` (default: collate; dpo.collate_pairs for preference pairs). With data.workers
    > 0, that many processes prepare the next steps while the current one trains (two steps ahead
    each); with 0, every step is prepared in the training process when it is needed. With several
    ranks, each step is this rank's share of it (see TrainSteps)."""
    steps = TrainSteps(ds, cfg, family, processor, batch_size, grad_accum, seed, first, last, world_size, rank,
                       collate_fn)
    # Its own generator: a DataLoader draws a seed for its workers when iterated, and from the
    # global RNG that would shift every dropout mask after it (and break exact resume).
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                       prefetch_factor=2 if cfg.workers else None, generator=torch.Generator())
