"""Datasets in, batches out: loading through `datasets`, length filtering, shuffled batching."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import ModuleType

import datasets
import torch

from minivlm.config import ConfigError, DataConfig


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One split of `cfg.dataset`: a hub id, a local imagefolder dir, or a .jsonl/.parquet file.

    `split` takes `datasets` slicing, e.g. "train[:10%]".
    """
    src = Path(cfg.dataset)
    try:
        if src.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(src), split=split)
        elif src.suffix in (".jsonl", ".json", ".parquet"):
            builder = "parquet" if src.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=str(src), split=split)
        else:
            ds = datasets.load_dataset(cfg.dataset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(f"cannot load split {split!r} of data.dataset = {cfg.dataset!r}: {e}") from None
    wanted = [cfg.image_column, cfg.question_column, cfg.answer_column]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no column(s) {missing}; its columns are "
                          f"{ds.column_names}: set data.image_column / question_column / answer_column")
    return ds


def prompt_of(cfg: DataConfig, question: str) -> str:
    return cfg.prompt_template.format(question=question)


def drop_too_long(ds: datasets.Dataset, cfg: DataConfig, family: ModuleType, processor) -> datasets.Dataset:
    """Remove samples longer than `cfg.max_length`, so no batch ever needs truncating.

    Truncation would cut the answer (or, worse, image tokens, which the model must see in
    full); a dropped sample is a smaller harm, and we say how many.
    """
    def fits(question: str, answer: str) -> bool:
        return family.sequence_length(processor, prompt_of(cfg, question), str(answer)) <= cfg.max_length

    kept = ds.filter(fits, input_columns=[cfg.question_column, cfg.answer_column])
    if len(kept) == 0:
        raise ConfigError(f"every sample is longer than data.max_length = {cfg.max_length} tokens; raise it")
    if len(kept) < len(ds):
        warnings.warn(f"dropped {len(ds) - len(kept)} of {len(ds)} samples longer than data.max_length = "
                      f"{cfg.max_length} tokens (raise it to keep them)")
    return kept


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch; a function of (seed, epoch) only, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor) -> dict[str, torch.Tensor]:
    rows = ds[indices]  # one columnar read
    images = [im.convert("RGB") for im in rows[cfg.image_column]]
    prompts = [prompt_of(cfg, q) for q in rows[cfg.question_column]]
    answers = [str(a) for a in rows[cfg.answer_column]]
    return family.training_batch(processor, images, prompts, answers)
