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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch; a function of (seed, epoch) only, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)


def answer_text(answer) -> str:
    """Datasets store answers as strings or as lists of accepted answers (ChartQA); train on the first."""
    return str(answer[0] if isinstance(answer, (list, tuple)) else answer)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor) -> dict[str, torch.Tensor]:
    """The family's training batch for `ds[indices]`, minus any sample longer than `cfg.max_length`.

    Too-long samples are dropped, never truncated: truncation would cut the answer or, worse,
    image tokens, whose count the model checks against the image features.
    """
    rows = ds[indices]  # one columnar read
    images = [im.convert("RGB") for im in rows[cfg.image_column]]
    prompts = [prompt_of(cfg, q) for q in rows[cfg.question_column]]
    answers = [answer_text(a) for a in rows[cfg.answer_column]]
    batch = family.training_batch(processor, images, prompts, answers, system=cfg.system_prompt)
    lengths = batch["attention_mask"].sum(1)
    keep = lengths <= cfg.max_length
    if not keep.all():
        dropped = [i for i, k in zip(indices, keep.tolist()) if not k]
        warnings.warn(f"dropped sample(s) {dropped}: longer than data.max_length = {cfg.max_length} tokens "
                      f"({lengths.max().item()}); raise data.max_length to train on them")
        batch = _select_rows(batch, keep, int(lengths[keep].max()) if keep.any() else 0)
    return batch


def _select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Keep the rows where `keep`; cut the (right) padding of the token tensors to `length`."""
    n, seq = batch["input_ids"].shape
    out = {}
    for key, value in batch.items():
        value = value[keep] if value.shape[0] == n else value
        out[key] = value[:, :length] if value.dim() == 2 and value.shape[1] == seq else value
    return out
