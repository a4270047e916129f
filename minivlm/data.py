"""Datasets in, batches out: loading through `datasets`, prompts and answers, shuffled batches.

A row whose image cannot be read, or whose answer is missing, is a bad sample: skipped with a
warning and counted (data.on_bad_sample = "skip"), or a stop (= "fail"). List a split's bad rows
before training with

    python -m minivlm.data --config configs/demo.toml [--split train]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import string
import sys
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minivlm.config import ConfigError, DataConfig, load_config
from minivlm.models import FAMILIES, get_family


class BadSample(ConfigError):
    """One row that cannot be trained on; the message says why (and names the file). A
    ConfigError, so that code reading one row by itself reports it as one line."""


# What reading and decoding an image can raise: missing or unreadable files (OSError, which
# covers PIL's UnidentifiedImageError, "image file is truncated" and a failed download),
# decoder complaints (PIL's PNG reader raises SyntaxError for a broken chunk), oversized images.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

URL_TIMEOUT_S = 10  # one try per URL image: offline, it fails in seconds instead of retrying

# (dataset fingerprint, row) -> reason, for every bad row this process has skipped: each is
# warned about once, not once per epoch, and the warnings carry the running count. With
# data.workers > 0 each worker process keeps its own.
_skipped: dict[tuple[str, int], str] = {}


def skipped_rows(ds: datasets.Dataset | None = None) -> dict[tuple[str, int], str]:
    """The bad rows skipped so far in this process (of `ds` only, if given), for an end-of-run summary."""
    return {k: v for k, v in _skipped.items() if ds is None or k[0] == ds._fingerprint}


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
    except datasets.exceptions.DatasetGenerationError as e:  # the file's own error is its __cause__
        raise ConfigError(f"data.dataset = {cfg.dataset!r} cannot be read: {e.__cause__ or e}; fix the file "
                          "(JSON Lines: one complete JSON object per line)") from None
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
    """The image column and every column the prompt and answer templates read (and, in preference
    data, the rejected answers')."""
    extra = [c for c in (cfg.references_column, cfg.rejected_column) if c]
    if cfg.conversations_column:
        return [cfg.image_column, cfg.conversations_column, *extra]
    aliases = {"question": cfg.question_column, "answer": cfg.answer_column}
    fields = _fields(cfg.prompt_template) | _fields(cfg.answer_template or "{answer}")
    return [cfg.image_column, *sorted(aliases.get(f, f) for f in fields), *extra]


def _row_values(cfg: DataConfig, row: dict, template: str) -> dict:
    values = {**row, "question": message_text(row.get(cfg.question_column))}
    if "answer" in _fields(template):  # only then: a prompt is also built for rows without an answer
        values["answer"] = answer_text(row.get(cfg.answer_column))
    return values


def prompt_of(cfg: DataConfig, row: dict) -> str:
    """data.prompt_template filled from one row: {question} is the question column, {name} any column."""
    return cfg.prompt_template.format(**_row_values(cfg, row, cfg.prompt_template))


def answer_of(cfg: DataConfig, row: dict) -> str:
    """The target text: the answer column, or data.answer_template filled from the row."""
    template = cfg.answer_template or "{answer}"
    return template.format(**_row_values(cfg, row, template))


def rejected_of(cfg: DataConfig, row: dict) -> str:
    """The dispreferred answer of a preference row (train.objective = "dpo"): data.rejected_column,
    through data.answer_template as the chosen answer (data.answer_column) is. A BadSample if it
    is missing or the same as the chosen one (there is nothing to prefer)."""
    try:
        rejected = answer_of(dataclasses.replace(cfg, answer_column=cfg.rejected_column), row)
    except BadSample as e:
        raise BadSample(f"data.rejected_column {cfg.rejected_column!r}: {e}") from None
    if rejected == answer_of(cfg, row):
        raise BadSample(f"the rejected answer is the chosen one ({rejected!r}): nothing to prefer")
    return rejected


def message_text(value):
    """A column in the conversational layout of TRL's datasets (HuggingFaceH4/rlaif-v_formatted)
    holds one chat message, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
    "text": "..."}]}]: read as its text parts. Any other value is returned as it is."""
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
        return value
    if len(value) != 1:
        raise BadSample(f"a column holds {len(value)} chat messages, where one prompt or one answer is read; "
                        "multi-turn dialogs go in data.conversations_column (LLaVA's from/value layout)")
    content = value[0].get("content")
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content or [] if part.get("type") == "text" and part.get("text"))


def dialog_of(cfg: DataConfig, row: dict) -> list[tuple[str, str]]:
    """The (user, assistant) exchanges of a row: one from the templates, or a LLaVA-style
    conversation [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]."""
    if not cfg.conversations_column:
        return [(prompt_of(cfg, row), answer_of(cfg, row))]
    turns = row[cfg.conversations_column] or []
    roles = [t.get("from") for t in turns]
    if not turns or len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
        raise BadSample(f"data.conversations_column {cfg.conversations_column!r}: expected alternating "
                        f"human/gpt turns, got {roles}")
    # The family's template places the image; drop the dataset's own <image> marker.
    text = [(t.get("value") or "").replace("<image>", "").strip() for t in turns]
    if not all(text[1::2]):
        raise BadSample("a gpt turn has no text")
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
    """The row's image as RGB, fully decoded; a BadSample naming the file if it cannot be read."""
    value = row[cfg.image_column]
    if isinstance(value, list):  # TRL's layout: a list of images, "images"
        if len(value) != 1:
            raise BadSample(f"data.image_column {cfg.image_column!r} holds {len(value)} images; a sample has one")
        value = value[0]
    if isinstance(value, str) and cfg.image_root and not value.startswith(("http://", "https://", "/")):
        value = str(Path(cfg.image_root) / value)
    if value is None:
        raise BadSample(f"data.image_column {cfg.image_column!r} is null")
    return read_image(value)


def read_image(source: Image.Image | str | Path | dict) -> Image.Image:
    """to_rgb(source), or a BadSample naming the file and what is wrong with it."""
    name = source.get("path") if isinstance(source, dict) else source if isinstance(source, (str, Path)) else None
    try:
        return to_rgb(source)
    except IMAGE_ERRORS as e:
        raise BadSample(f"image {name or '(embedded bytes)'} cannot be read: {type(e).__name__}: {e}") from None


def sample_of(cfg: DataConfig, row: dict) -> tuple[Image.Image, list[tuple[str, str]]]:
    """(image, exchanges) of one row; a BadSample if either cannot be had or, in preference data
    (data.rejected_column), the rejected answer cannot."""
    image, dialog = image_of(cfg, row), dialog_of(cfg, row)
    if cfg.rejected_column:
        rejected_of(cfg, row)
    return image, dialog


def check_dialogs(family: ModuleType, dialogs: list[list[tuple[str, str]]], system: str) -> None:
    """Refuse what a family without a chat template (CHAT = False) cannot write: a system turn, or
    more than one exchange in a sample. A ConfigError: the fix is in the config or the data."""
    if family.CHAT:
        return
    if system:
        raise ConfigError(f"{family.NAME} has no system turn; put the instruction into data.prompt_template "
                          "and leave data.system_prompt empty")
    if any(len(d) != 1 for d in dialogs):
        chat = [name for name in FAMILIES if get_family(name).CHAT]
        raise ConfigError(f"{family.NAME} learns one question per sample; multi-turn conversations need a "
                          f"chat-template family ({', '.join(chat)})")


def answer_text(answer) -> str:
    """Datasets store answers as strings or as lists of accepted answers (ChartQA); train on the first.
    A null or empty answer is a BadSample: str(None) would teach the model to write "None"."""
    answer = message_text(answer)
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else None
    if answer is None or not str(answer).strip():
        raise BadSample(f"the answer is {'null' if answer is None else 'empty'}")
    return str(answer)


def to_rgb(image: Image.Image | str | Path | dict) -> Image.Image:
    """A PIL image, a path, a URL or an undecoded `datasets` image ({"bytes", "path"}), as RGB.

    Decoded in full here (`load`), so that a truncated file fails now, naming itself, rather
    than later inside the processor. Transparency is composited on white: a bare convert("RGB")
    turns transparent pixels black (seed 002's convert_to_rgb). 16-bit and float greyscale is
    scaled to 8 bits first: convert() clips it at 255, and a 16-bit image comes out all white.
    """
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=URL_TIMEOUT_S) as response:  # HTTP errors raise
            image = io.BytesIO(response.read())
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image.load()  # also closes a file opened by path: no handle stays open per image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit samples (Pillow opens 16-bit PNGs as I;16, older versions as I): keep the top
        # 8 bits, so 65535 is white as 255 is, whatever the image holds.
        image = Image.fromarray((np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        # Float images have no agreed white: stretch their own range to 0..255.
        pixels = np.asarray(image, dtype=np.float64)
        low, span = pixels.min(), max(pixels.max() - pixels.min(), 1e-12)
        image = Image.fromarray(((pixels - low) / span * 255).round().astype(np.uint8))
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
        try:
            dialog = dialog_of(cfg, row)
        except BadSample:  # skipped (or refused) when its batch is collated, and counted there
            continue
        for _, answer in dialog:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            spelled = tokenizer.decode(ids, skip_special_tokens=True)
            # Compared without whitespace, which tokenizers are free to normalise.
            if tokenizer.unk_token_id in ids or "".join(spelled.split()) != "".join(answer.split()):
                bad.append((i, answer, tokenizer.convert_ids_to_tokens(ids)))
                break
    if bad:
        rows_listed = ", ".join(str(i) for i, _, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
        examples = "; ".join(f"row {i}: {a!r} -> {t}" for i, a, t in bad[:3])
        warnings.warn(f"{len(bad)} of the first {len(texts)} answers hold text the tokenizer cannot spell "
                      f"(it becomes {tokenizer.unk_token or 'nothing'}), in rows {rows_listed}; e.g. {examples}. "
                      "The model cannot learn to write it: use a base whose tokenizer covers it, or reword "
                      "those answers.")
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

    With `world_size` data-parallel ranks, a micro-batch of the step is world_size × batch_size
    samples, of which rank r collates the r-th batch_size: N ranks × batch b then train on the
    same samples in the same steps as one process with batch N·b, and the split is still a pure
    function of (seed, epoch, world size, step). The window returned holds the whole micro-batches
    (all ranks' samples); the collated batches, this rank's slices only, one per micro-batch even
    where the slice is empty (at an epoch's short end): a batch of zero rows, so that every rank
    counts the same micro-batches (see loop.backward_window). Random crops are drawn per rank, so
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

    def __getitem__(self, k: int) -> tuple[int, list[list[int]], list[dict[str, torch.Tensor]]]:
        step = self.first + k
        epoch, offset = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches(len(self.ds), self.batch_size * self.world_size, self.seed, epoch))
        window = self._order[1][offset * self.grad_accum:(offset + 1) * self.grad_accum]
        mine = [idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for idx in window]
        crops = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        family = get_family(self.family)  # held by name: a module object does not pickle into workers
        return step, window, [self.collate(self.ds, idx, self.cfg, family, self.processor, crops) for idx in mine]


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


def rows_of(ds: datasets.Dataset, indices: list[int]) -> list[dict]:
    """Rows as dicts, with `datasets` images left undecoded ({"bytes", "path"}): to_rgb decodes
    them one by one, so an unreadable file costs its own row, not the whole batch read."""
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))  # a schema change, no data rewritten
    columns = ds[indices]  # one columnar read
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def usable_samples(ds: datasets.Dataset, indices: list[int],
                   cfg: DataConfig) -> list[tuple[int, dict, Image.Image, list[tuple[str, str]]]]:
    """(index, row, image, exchanges) for each of `ds[indices]` that can be used. A bad one is
    skipped with a warning (once per row, with the running count) or, with data.on_bad_sample =
    "fail", stops everything with a ConfigError naming the row, the problem and the fix."""
    samples = []
    for index, row in zip(indices, rows_of(ds, indices)):
        try:
            samples.append((index, row, *sample_of(cfg, row)))
        except BadSample as e:
            where = f"row {index} of split {str(ds.split or '?')!r}"
            if cfg.on_bad_sample == "fail":
                raise ConfigError(f"{where}: {e}. Fix or remove the row, or set data.on_bad_sample = \"skip\" to "
                                  "train without it; `python -m minivlm.data --config <config>` lists every bad "
                                  "row") from None
            key = (ds._fingerprint, index)  # a content hash: the same split read twice is one split
            if key not in _skipped:
                _skipped[key] = str(e)
                warnings.warn(f"skipped {where}: {e} ({len(_skipped)} bad row(s) skipped so far; "
                              "`python -m minivlm.data --config <config>` lists them all)")
    return samples


def check_split(ds: datasets.Dataset, cfg: DataConfig, rows: list[int] | None = None,
                chunk: int = 64) -> list[tuple[int, str]]:
    """(row, reason) for every row of `ds` (or of `rows`) that training would skip: each image
    opened and decoded, each answer read. Nothing is kept in memory but the current chunk."""
    rows = list(range(len(ds))) if rows is None else rows
    bad = []
    for start in range(0, len(rows), chunk):
        indices = rows[start:start + chunk]
        for index, row in zip(indices, rows_of(ds, indices)):
            try:
                sample_of(cfg, row)
            except BadSample as e:
                bad.append((index, str(e)))
    return bad


def answer_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq) bool: the positions whose *next* token is a labelled one, the only ones whose
    logits the loss needs (the last position predicts nothing)."""
    return F.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The family's training batch for `ds[indices]`, minus bad samples (see usable_samples) and
    any sample longer than `cfg.max_length`.

    Too-long samples are dropped, never truncated: truncation would cut the answer or, worse,
    image tokens, whose count the model checks against the image features. Training passes a
    `generator`, from which data.random_resized_crop draws its crops; without one (validation)
    images are not cropped.
    """
    samples = usable_samples(ds, indices, cfg)
    if not samples:  # every sample bad: a batch of zero rows, which the loop skips (no answer tokens)
        return {key: torch.zeros(0, 0, dtype=torch.long) for key in ("input_ids", "attention_mask", "labels")}
    indices = [index for index, *_ in samples]
    images = [image for _, _, image, _ in samples]
    if cfg.random_resized_crop and generator is not None:
        images = [random_resized_crop(im, cfg.random_resized_crop, generator) for im in images]
    dialogs = [dialog for *_, dialog in samples]
    check_dialogs(family, dialogs, cfg.system_prompt)
    batch = family.training_batch(processor, images, dialogs, system=cfg.system_prompt)
    lengths = batch["attention_mask"].sum(1)
    keep = lengths <= cfg.max_length
    if not keep.all():
        dropped = [i for i, k in zip(indices, keep.tolist()) if not k]
        warnings.warn(f"dropped sample(s) {dropped}: longer than data.max_length = {cfg.max_length} tokens "
                      f"({lengths.max().item()}); raise data.max_length to train on them")
        batch = select_rows(batch, keep, int(lengths[keep].max()) if keep.any() else 0)
    return batch


def select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Keep the rows where `keep`; cut the (right) padding of the token tensors to `length`."""
    n, seq = batch["input_ids"].shape
    out = {}
    for key, value in batch.items():
        value = value[keep] if value.shape[0] == n else value
        out[key] = value[:, :length] if value.dim() == 2 and value.shape[1] == seq else value
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m minivlm.data --config C [--split S]`: list the rows training would skip."""
    ap = argparse.ArgumentParser(description="List the rows of a split whose image cannot be read or whose "
                                 "answer is missing (what training skips, or stops at with data.on_bad_sample = "
                                 "\"fail\"). Exits 1 if there are any.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", help="default: data.train_split")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        split = args.split or cfg.data.train_split
        ds = load_split(cfg.data, split)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    bad = check_split(ds, cfg.data)
    for row, reason in bad:
        print(f"row {row}: {reason}")
    print(f"{len(bad)} bad row(s) of {len(ds)} in split {split!r}" if bad else f"all {len(ds)} rows of split "
          f"{split!r} are usable")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
