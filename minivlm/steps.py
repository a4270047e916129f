"""Which samples each optimizer step trains on, and how many steps a run has.

An epoch is a shuffle of the training split, a pure function of (seed, epoch) (with
data.group_by_length, of the samples' lengths too: grouped_batches); a step is
`grad_accum` micro-batches of it, and under torchrun each micro-batch is world_size × batch_size
samples, of which each rank takes its slice. So any step can be rebuilt from its number alone:
a resumed run starts at its step, and DataLoader workers can prepare steps in any process.
A stream (data.streaming) has no random access: its steps are read in order (StreamSteps).

An objective may train on each window of samples for several optimizer steps (GRPO's
grpo.iterations, TRL's num_iterations: a sampled batch serves μ updates). Then a window serves
`repeat` consecutive steps: the first collates it, the others are the same window with no
batches (the objective kept what it made of them), and an epoch has `repeat` times the steps.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import datasets
import torch

from minivlm.batches import collate
from minivlm.config import ConfigError, DataConfig, TrainConfig
from minivlm.data import Rows, first_rows, identity, skipped_count, skipped_since, undecoded
from minivlm.distributed import is_main
from minivlm.models import get_family


class Step(NamedTuple):
    """One optimizer step's data, as the loader hands it to the loop."""

    number: int  # 0-based: the step that takes the run to `number + 1`
    epoch: int
    window: list[list[int]]  # the sample numbers of each micro-batch, every rank's
    batches: list[dict[str, torch.Tensor]]  # this rank's collated micro-batches; [] when the window repeats
    skipped: dict  # bad rows first skipped in making them: a DataLoader worker's reach the loop this way
    resume_at: dict | None  # a stream's: where the step after it starts (StreamSteps); saved with the step


def collated_step(parts: TrainSteps | StreamSteps, number: int, epoch: int, rows: datasets.Dataset | Rows,
                  window: list[list[int]], resume_at: dict | None) -> Step:
    """The Step of `window` (every rank's sample numbers, per micro-batch) read from `rows` (a
    Dataset, or a stream's Rows): this rank's slice of each micro-batch, collated with random
    crops seeded by (seed, step), and the bad rows first skipped in collating them. `parts`: a
    TrainSteps or StreamSteps, whose settings say how."""
    mine = [idx[parts.rank * parts.batch_size:(parts.rank + 1) * parts.batch_size] for idx in window]
    crops = torch.Generator().manual_seed(parts.seed * 1_000_003 + number)
    family = get_family(parts.family)  # held by name: a module object does not pickle into workers
    mark = skipped_count()
    batches = [parts.collate(rows, idx, parts.cfg, family, parts.processor, crops) for idx in mine]
    return Step(number, epoch, window, batches, skipped_since(mark), resume_at)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random numbers of an epoch's order: a function of (seed, epoch) only, so resume can replay it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch (epoch_generator's)."""
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


GROUP = 50  # micro-batches sorted together by data.group_by_length: the transformers Trainer's mega-batch


def grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """data.group_by_length's index batches for one epoch: epoch_batches' shuffle, cut into groups
    of GROUP micro-batches, each group sorted longest first and cut into micro-batches, so that
    a micro-batch holds samples of about one length and pads little. The micro-batches are then
    shuffled (the same generator: still a function of (seed, epoch) only), the short one at the
    epoch's end kept last, and the one holding the longest sample put first, so that a run that
    will run out of memory does so at its first step (as the transformers Trainer's
    LengthGroupedSampler does)."""
    n = len(lengths)
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g).tolist()
    span = batch_size * GROUP
    ordered = [i for s in range(0, n, span) for i in sorted(order[s:s + span], key=lambda i: -lengths[i])]
    batches = [ordered[i:i + batch_size] for i in range(0, n, batch_size)]
    full = n // batch_size
    batches = [batches[k] for k in torch.randperm(full, generator=g).tolist()] + batches[full:]
    if full:
        longest = max(range(full), key=lambda k: max(lengths[i] for i in batches[k]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def sample_lengths(ds: datasets.Dataset, cfg: DataConfig, family: str, processor,
                   collate_fn: Callable = collate) -> list[int]:
    """Each row's length in tokens, for data.group_by_length: data.length_column's numbers, or
    measured once by collating every row alone (its longest row: DPO's pair is two), 0 for a
    row that is skipped. Measuring decodes and processes every image once, as the first epoch will;
    a large set is better given a length column."""
    if cfg.length_column:
        if cfg.length_column not in ds.column_names:
            raise ConfigError(f"data.length_column = {cfg.length_column!r} is not a column of the training split "
                              f"(its columns: {', '.join(ds.column_names)}); name one, or leave it empty to measure")
        return [int(length) for length in ds[cfg.length_column]]
    module, t0 = get_family(family), time.perf_counter()
    with warnings.catch_warnings():  # a dropped row warns when it is trained on, not here too
        warnings.simplefilter("ignore")
        lengths = [tokens_in(collate_fn(ds, [i], cfg, module, processor)["attention_mask"]) for i in range(len(ds))]
    if is_main():
        print(f"data.group_by_length: measured the lengths of {len(ds)} samples in {time.perf_counter() - t0:.1f} s "
              "(data.length_column skips this)")
    return lengths


def tokens_in(mask: torch.Tensor) -> int:
    """A collated sample's length: its longest row's real tokens (0 for a skipped sample's empty batch)."""
    return int(mask.sum(1).max()) if len(mask) else 0


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)


def total_steps(t: TrainConfig, ds: datasets.Dataset | datasets.IterableDataset, world_size: int = 1,
                repeat: int = 1) -> int:
    """Optimizer steps of a run: train.max_steps, or train.epochs epochs of `ds`, each window of
    world_size × batch_size samples per micro-batch serving `repeat` steps. (A stream has no length:
    config.py requires train.max_steps with it.)"""
    return t.max_steps or steps_per_epoch(len(ds), t.batch_size * world_size, t.grad_accum) * t.epochs * repeat


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
                 collate_fn: Callable | None = None, repeat: int = 1, lengths: list[int] | None = None):
        self.ds, self.cfg, self.family, self.processor = ds, cfg, family, processor
        self.lengths = lengths  # data.group_by_length's (sample_lengths), else None
        self.collate = collate_fn or collate  # dpo.collate_pairs for preference pairs
        self.batch_size, self.grad_accum, self.seed, self.first, self.last = batch_size, grad_accum, seed, first, last
        self.world_size, self.rank, self.repeat = world_size, rank, repeat
        self.per_epoch = steps_per_epoch(len(ds), batch_size * world_size, grad_accum)
        self._order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches): one shuffle per epoch

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, k: int) -> Step:
        step = self.first + k
        served, again = divmod(step, self.repeat)  # the window's number, and whether it repeats
        epoch, offset = divmod(served, self.per_epoch)
        if self._order[0] != epoch:
            width = self.batch_size * self.world_size
            self._order = (epoch, epoch_batches(len(self.ds), width, self.seed, epoch) if self.lengths is None
                           else grouped_batches(self.lengths, width, self.seed, epoch))
        window = self._order[1][offset * self.grad_accum:(offset + 1) * self.grad_accum]
        if again:
            return Step(step, epoch, window, [], {}, None)
        return collated_step(self, step, epoch, self.ds, window, None)


class StreamSteps(torch.utils.data.IterableDataset):
    """Steps first..last-1 of a stream (data.streaming), each the next world_size × batch_size ×
    grad_accum rows of it, split into micro-batches and rank slices as TrainSteps splits a step.

    A stream has no length and no random access. It is read in order, epoch after epoch, each
    epoch shuffled anew within data.shuffle_buffer rows (by `datasets`, from seed and epoch), and
    a step whose rows run past an epoch's end takes the rest from the next. A row's number is how
    many rows the run read before it. Where a step starts is thus {"epoch", "row" (in that epoch),
    "read" (rows before it)}, and every save records the next step's (Step.resume_at): a resumed
    run reads that epoch again from its start and skips to that row, reading the rows before it
    without decoding their images, as the transformers Trainer replays a resumed epoch's first
    batches.

    With DataLoader workers, worker w of W collates steps first + w, first + w + W, ...: each reads
    the whole stream and decodes only its own steps' images, and the DataLoader takes the
    workers' steps in turn, so the steps come in the one-process order whatever W is.

    A repeated window (`repeat` > 1) reads nothing: its steps record where the stream reads on
    after the window, so a run resumed inside one starts with the window's rows just read.
    """

    def __init__(self, stream: datasets.IterableDataset, cfg: DataConfig, family: str, processor, batch_size: int,
                 grad_accum: int, seed: int, first: int, last: int, start: dict | None = None, world_size: int = 1,
                 rank: int = 0, collate_fn: Callable | None = None, repeat: int = 1):
        self.source = identity(stream)
        stream = undecoded(stream)
        self.stream = stream.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer) if cfg.shuffle_buffer else stream
        self.cfg, self.family, self.processor, self.collate = cfg, family, processor, collate_fn or collate
        self.batch_size, self.grad_accum, self.seed, self.first, self.last = batch_size, grad_accum, seed, first, last
        self.world_size, self.rank, self.repeat = world_size, rank, repeat
        self.start = start or {"epoch": 0, "row": 0, "read": 0}

    def __len__(self) -> int:
        return self.last - self.first

    def _rows(self) -> Iterator[tuple[dict, dict]]:
        """(where the row is, the row), from self.start on, epoch after epoch, without end."""
        epoch, row, read = self.start["epoch"], self.start["row"], self.start["read"]
        while True:
            self.stream.set_epoch(epoch)  # the epoch's shuffle: datasets derives it from (seed, epoch)
            # .iter(), not iter(stream): inside a DataLoader worker, datasets hands a stream's plain
            # iteration only that worker's share of the files.
            chunks = self.stream.iter(batch_size=256)
            rows = (dict(zip(chunk, values)) for chunk in chunks for values in zip(*chunk.values()))
            for data in itertools.islice(rows, row, None):  # a resumed epoch: read up to its row
                yield {"epoch": epoch, "row": row, "read": read}, data
                row, read = row + 1, read + 1
            if row == 0:
                raise ConfigError(f"the training stream {self.source} has no rows (epoch {epoch})")
            epoch, row = epoch + 1, 0

    def __iter__(self) -> Iterator[Step]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = self._rows()
        width = self.batch_size * self.world_size
        # Resumed inside a repeated window: it is the rows just before where the stream reads on.
        numbers = list(range(self.start["read"] - width * self.grad_accum, self.start["read"]))
        last = Step(self.first, self.start["epoch"], [numbers[i:i + width] for i in range(0, len(numbers), width)],
                    [], {}, self.start)
        for step in range(self.first, self.last):
            mine = (step - self.first) % workers == worker  # else another worker's step: read past, not decoded
            if step % self.repeat:
                if mine:
                    yield last._replace(number=step, batches=[], skipped={})
                continue
            read = list(itertools.islice(rows, width * self.grad_accum))
            numbers = [where["read"] for where, _ in read]
            window = [numbers[i:i + width] for i in range(0, len(numbers), width)]
            after = read[-1][0]
            resume_at = {"epoch": after["epoch"], "row": after["row"] + 1, "read": after["read"] + 1}
            last = Step(step, read[0][0]["epoch"], window, [], {}, resume_at)
            if mine:
                yield collated_step(self, step, last.epoch, Rows(self.source, {w["read"]: row for w, row in read}),
                                    window, resume_at)


def filler_batch(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, family: ModuleType,
                 processor, rows: int = 64) -> dict[str, torch.Tensor]:
    """The first usable sample of `ds` (of its first `rows`) with every label masked: a forward
    and backward that add exactly zero to every gradient. Under DDP, a rank whose slice of a
    micro-batch holds no usable sample runs it instead, because every rank must take part in
    each synchronised backward."""
    first, indices = first_rows(ds, rows)
    for i in indices:
        batch = collate(first, [i], cfg, family, processor)
        if len(batch["input_ids"]):
            return {**batch, "labels": torch.full_like(batch["labels"], -100)}
    raise ValueError(f"none of the first {len(indices)} training rows is usable (see data.on_bad_sample and "
                     "data.max_length)")


def train_loader(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, family: str, processor,
                 batch_size: int, grad_accum: int, seed: int, first: int, last: int, world_size: int = 1,
                 rank: int = 0, collate_fn: Callable | None = None, resume_at: dict | None = None,
                 repeat: int = 1) -> torch.utils.data.DataLoader:
    """Steps first..last-1 in order (each a Step), collated by `collate_fn` (default: collate;
    dpo.collate_pairs for preference pairs). With data.workers > 0, that many processes prepare
    the next steps while the current one trains (two steps ahead each); with 0, every step is
    prepared in the training process when it is needed. With several ranks, each step is this
    rank's share of it (see TrainSteps). A stream (StreamSteps) starts at `resume_at`, the
    position the save of step `first` recorded. `repeat`: optimizer steps each window serves."""
    if isinstance(ds, datasets.IterableDataset):
        steps = StreamSteps(ds, cfg, family, processor, batch_size, grad_accum, seed, first, last, resume_at,
                            world_size, rank, collate_fn, repeat)
    else:
        lengths = sample_lengths(ds, cfg, family, processor, collate_fn or collate) if cfg.group_by_length else None
        steps = TrainSteps(ds, cfg, family, processor, batch_size, grad_accum, seed, first, last, world_size, rank,
                           collate_fn, repeat, lengths)
    # Its own generator: a DataLoader draws a seed for its workers when iterated, and from the
    # global RNG that would shift every dropout mask after it (and break exact resume).
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                       prefetch_factor=2 if cfg.workers else None, generator=torch.Generator())
