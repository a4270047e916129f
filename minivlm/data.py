"""Datasets in, batches out: loading through `datasets`, prompts and answers, shuffled batches."""

from __future__ import annotations

import contextlib
import math
import string
import warnings
from pathlib import Path
from types import ModuleType

import datasets
import torch
from PIL import Image
from transformers.image_utils import load_image

from minivlm.config import ConfigError, DataConfig
from minivlm.models import get_family


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One split of `cfg.dataset`: a hub id, a local imagefolder dir, or a .jsonl/.parquet file.

    `split` takes `datasets` slicing, e.g. "train[:10%]".
    """
    src = Path(cfg.dataset)
    try:
        if src.is_dir():
            with _local_files_quietly():
                ds = datasets.load_dataset("imagefolder", data_dir=str(src), split=split)
        elif src.suffix in (".jsonl", ".json", ".parquet"):
            builder = "parquet" if src.suffix == ".parquet" else "json"
            with _local_files_quietly():
                ds = datasets.load_dataset(builder, data_files=str(src), split=split)
        else:
            ds = datasets.load_dataset(cfg.dataset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(f"cannot load split {split!r} of data.dataset = {cfg.dataset!r}: {e}") from None
    missing = [c for c in required_columns(cfg) if c not in ds.column_names]
    if missing:
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no column(s) {missing}; its columns are "
                          f"{ds.column_names}: set data.image_column / question_column / answer_column, "
                          "or the fields of data.prompt_template / answer_template")
    return ds


@contextlib.contextmanager
def _local_files_quietly():
    """No progress bars while `datasets` indexes local files: they read "Downloading data" and
    "Generating split" although nothing is downloaded. Hub datasets keep their bars."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def required_columns(cfg: DataConfig) -> list[str]:
    """The image column and every column the prompt and answer templates read."""
    extra = [cfg.references_column] if cfg.references_column else []
    if cfg.conversations_column:
        return [cfg.image_column, cfg.conversations_column, *extra]
    aliases = {"question": cfg.question_column, "answer": cfg.answer_column}
    fields = _fields(cfg.prompt_template) | _fields(cfg.answer_template or "{answer}")
    return [cfg.image_column, *sorted(aliases.get(f, f) for f in fields), *extra]


def _row_values(cfg: DataConfig, row: dict) -> dict:
    return {**row, "question": row.get(cfg.question_column), "answer": answer_text(row.get(cfg.answer_column))}


def prompt_of(cfg: DataConfig, row: dict) -> str:
    """data.prompt_template filled from one row: {question} is the question column, {name} any column."""
    return cfg.prompt_template.format(**_row_values(cfg, row))


def answer_of(cfg: DataConfig, row: dict) -> str:
    """The target text: the answer column, or data.answer_template filled from the row."""
    values = _row_values(cfg, row)
    return cfg.answer_template.format(**values) if cfg.answer_template else values["answer"]


def dialog_of(cfg: DataConfig, row: dict) -> list[tuple[str, str]]:
    """The (user, assistant) exchanges of a row: one from the templates, or a LLaVA-style
    conversation [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]."""
    if not cfg.conversations_column:
        return [(prompt_of(cfg, row), answer_of(cfg, row))]
    turns = row[cfg.conversations_column]
    roles = [t["from"] for t in turns]
    if len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
        raise ConfigError(f"data.conversations_column {cfg.conversations_column!r}: expected alternating "
                         f"human/gpt turns, got {roles}")
    # The family's template places the image; drop the dataset's own <image> marker.
    text = [t["value"].replace("<image>", "").strip() for t in turns]
    return list(zip(text[0::2], text[1::2]))


def references_of(cfg: DataConfig, row: dict) -> list[str]:
    """The answers a prediction is scored against: data.references_column (a string, a list of
    strings, or VQAv2's list of {"answer": ...}), else the first exchange's answer."""
    if not cfg.references_column:
        return [dialog_of(cfg, row)[0][1]]
    value = row[cfg.references_column]
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v["answer"] if isinstance(v, dict) else str(v) for v in values]


def image_of(cfg: DataConfig, row: dict) -> Image.Image:
    value = row[cfg.image_column]
    if isinstance(value, str) and cfg.image_root and not value.startswith(("http://", "https://", "/")):
        value = str(Path(cfg.image_root) / value)
    return to_rgb(value)


def answer_text(answer) -> str:
    """Datasets store answers as strings or as lists of accepted answers (ChartQA); train on the first."""
    return str(answer[0] if isinstance(answer, (list, tuple)) else answer)


def to_rgb(image: Image.Image | str) -> Image.Image:
    """A PIL image, a path or a URL, as RGB. Transparency is composited on white: a bare
    convert("RGB") turns transparent pixels black (seed 002's convert_to_rgb)."""
    if isinstance(image, str):  # transformers' load_image fetches URLs (and flattens alpha itself)
        image = load_image(image) if image.startswith(("http://", "https://")) else Image.open(image)
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")


def random_resized_crop(image: Image.Image, scale: list[float], generator: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop without the resize (the processor resizes next): a random
    region of `scale` of the area and aspect ratio in `ratio`, drawn from `generator`."""
    w, h = image.size
    for _ in range(10):
        area = w * h * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).item())
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            y = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            return image.crop((x, y, x + cw, y + ch))
    return image


def warn_unknown_answers(ds: datasets.Dataset, cfg: DataConfig, tokenizer, rows: int = 1000) -> int:
    """Warn when answers hold text the tokenizer cannot spell: it becomes the unknown token, or
    vanishes (a tokenizer without one drops what it does not know), and the model can only learn
    to write that. Returns how many of the first `rows` answers are affected."""
    # Answers only: decoding a thousand images to read strings would cost seconds and memory.
    texts = ds.select(range(min(rows, len(ds)))).remove_columns(cfg.image_column)
    bad = []
    for i, row in enumerate(rows_of(texts, list(range(len(texts))))):
        for _, answer in dialog_of(cfg, row):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            spelled = tokenizer.decode(ids, skip_special_tokens=True)
            # Compared without whitespace, which tokenizers are free to normalise.
            if tokenizer.unk_token_id in ids or "".join(spelled.split()) != "".join(answer.split()):
                bad.append((i, answer, tokenizer.convert_ids_to_tokens(ids)))
                break
    if bad:
        examples = "; ".join(f"row {i}: {a!r} -> {t}" for i, a, t in bad[:3])
        warnings.warn(f"{len(bad)} of the first {len(texts)} answers hold text the tokenizer cannot spell "
                      f"(it becomes {tokenizer.unk_token or 'nothing'}), e.g. {examples}. The model cannot learn to "
                      "write it: use a base whose tokenizer covers it, or reword those answers.")
    return len(bad)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch; a function of (seed, epoch) only, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)


class TrainSteps(torch.utils.data.Dataset):
    """Item k: the sample indices and collated micro-batches of optimizer step `first + k`.

    Addressed by step, not iterated: which samples a step trains on is epoch_batches(seed, epoch),
    a pure function of the step. So DataLoader workers can prepare any step in any process, in
    the order the loop asks for, and a resumed run simply starts at its step. Random crops draw
    from a generator seeded by (seed, step) for the same reason: a worker's global RNG is not the
    trainer's, and the crops must not depend on how many workers there are.
    """

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, family: str, processor, batch_size: int,
                 grad_accum: int, seed: int, first: int, last: int):
        self.ds, self.cfg, self.family, self.processor = ds, cfg, family, processor
        self.batch_size, self.grad_accum, self.seed, self.first, self.last = batch_size, grad_accum, seed, first, last
        self.per_epoch = steps_per_epoch(len(ds), batch_size, grad_accum)
        self._order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches): one shuffle per epoch

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, k: int) -> tuple[int, list[list[int]], list[dict[str, torch.Tensor]]]:
        step = self.first + k
        epoch, offset = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches(len(self.ds), self.batch_size, self.seed, epoch))
        window = self._order[1][offset * self.grad_accum:(offset + 1) * self.grad_accum]
        crops = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        family = get_family(self.family)  # held by name: a module object does not pickle into workers
        return step, window, [collate(self.ds, idx, self.cfg, family, self.processor, crops) for idx in window]


def train_loader(ds: datasets.Dataset, cfg: DataConfig, family: str, processor, batch_size: int, grad_accum: int,
                 seed: int, first: int, last: int) -> torch.utils.data.DataLoader:
    """Steps first..last-1 in order, each (step, sample indices, micro-batches). With data.workers
    > 0, that many processes prepare the next steps while the current one trains (two steps ahead
    each); with 0, every step is prepared in the training process when it is needed."""
    steps = TrainSteps(ds, cfg, family, processor, batch_size, grad_accum, seed, first, last)
    # Its own generator: a DataLoader draws a seed for its workers when iterated, and from the
    # global RNG that would shift every dropout mask after it (and break exact resume).
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                       prefetch_factor=2 if cfg.workers else None, generator=torch.Generator())


def rows_of(ds: datasets.Dataset, indices: list[int]) -> list[dict]:
    columns = ds[indices]  # one columnar read
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The family's training batch for `ds[indices]`, minus any sample longer than `cfg.max_length`.

    Too-long samples are dropped, never truncated: truncation would cut the answer or, worse,
    image tokens, whose count the model checks against the image features. Training passes a
    `generator`, from which data.random_resized_crop draws its crops; without one (validation)
    images are not cropped.
    """
    rows = rows_of(ds, indices)
    images = [image_of(cfg, row) for row in rows]
    if cfg.random_resized_crop and generator is not None:
        images = [random_resized_crop(im, cfg.random_resized_crop, generator) for im in images]
    batch = family.training_batch(processor, images, [dialog_of(cfg, row) for row in rows], system=cfg.system_prompt)
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
