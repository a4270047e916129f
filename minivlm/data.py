"""Rows in: a split loaded through `datasets`, each row read as (images, dialog), bad rows skipped.

batches.py turns samples into the family's tensors; steps.py decides which go into each step.

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
import itertools
import math
import string
import sys
import urllib.request
import warnings
from pathlib import Path

from minivlm.config import ConfigError, DataConfig, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of `python -m minivlm.data --config C [--split S]` (main)."""
    ap = argparse.ArgumentParser(description="List the rows of a split whose image cannot be read or whose "
                                 "answer is missing (what training skips, or stops at with data.on_bad_sample = "
                                 "\"fail\"). Exits 1 if there are any.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", help="default: data.train_split")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return ap.parse_args(argv)


# `python -m minivlm.data` runs this whole file before main(). Its arguments are read here, ahead of
# the imports below (datasets, and torch and transformers through models.chat: seconds), so that
# --help and a mistyped option answer at once; main() reads them again.
if __name__ == "__main__":
    parse_args()

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from minivlm.models.chat import IMAGE, MARKER, VIDEO, Media, Video  # noqa: E402


class BadSample(ConfigError):
    """One row that cannot be trained on; the message says why (and names the file). A
    ConfigError, so that code reading one row by itself reports it as one line."""


# What reading and decoding an image can raise: missing or unreadable files (OSError, which
# covers PIL's UnidentifiedImageError, "image file is truncated" and a failed download),
# decoder complaints (PIL's PNG reader raises SyntaxError for a broken chunk), oversized images.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

ORIENTATION = 0x0112  # the EXIF tag

URL_TIMEOUT_S = 10  # one try per URL image: offline, it fails in seconds instead of retrying

# (dataset fingerprint, row) -> reason, for every bad row this process has skipped: each is
# warned about once, not once per epoch, and the warnings carry the running count. With
# data.workers > 0 each worker process keeps its own, and the training process gathers them
# (record_skipped).
_skipped: dict[tuple[str, int], str] = {}


def skipped_rows(ds: datasets.Dataset | None = None) -> dict[tuple[str, int], str]:
    """The bad rows skipped so far in this process (of `ds` only, if given), for an end-of-run summary."""
    return {k: v for k, v in _skipped.items() if ds is None or k[0] == identity(ds)}


def skipped_count() -> int:
    return len(_skipped)


def skipped_since(mark: int) -> dict[tuple[str, int], str]:
    """The rows skipped in this process after the first `mark` (a skipped_count() taken before)."""
    return dict(itertools.islice(_skipped.items(), mark, None))


def record_skipped(rows: dict[tuple[str, int], str]) -> None:
    """Count in this process rows another one skipped (a DataLoader worker: steps.TrainSteps hands
    them over with the step), so that the end-of-run summary holds every worker's."""
    _skipped.update(rows)


def load_split(cfg: DataConfig, split: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """One split of `cfg.dataset`: a hub id, a local imagefolder dir, or a .jsonl/.parquet file.

    `split` takes `datasets` slicing, e.g. "train[:10%]". `streaming`: a `datasets` stream
    (IterableDataset) instead, read as it is iterated: nothing is downloaded or converted first,
    for a split that does not fit on disk (data.streaming).
    """
    src = Path(cfg.dataset)
    if streaming and "[" in split:
        raise ConfigError(f"split {split!r}: a stream (data.streaming = true) cannot be sliced; name the whole "
                          "split and set train.max_steps to train on part of it")
    try:
        if src.is_dir():
            with _local_files_quietly():
                ds = (_imagefolder_metadata(src, split, streaming)
                      or datasets.load_dataset("imagefolder", data_dir=str(src), split=split, streaming=streaming))
        elif src.suffix in (".jsonl", ".json", ".parquet"):
            builder = "parquet" if src.suffix == ".parquet" else "json"
            with _local_files_quietly():
                ds = datasets.load_dataset(builder, data_files=str(src), split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(cfg.dataset, split=split, streaming=streaming)
        # A JSON stream knows its columns only once read: its first row tells.
        columns = ds.column_names if ds.column_names is not None else list(next(iter(ds.take(1)), {}))
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(f"cannot load split {split!r} of data.dataset = {cfg.dataset!r}: {e}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # the file's own error is its __cause__
        raise ConfigError(f"data.dataset = {cfg.dataset!r} cannot be read: {e.__cause__ or e}; fix the file "
                          "(JSON Lines: one complete JSON object per line)") from None
    missing = [c for c in required_columns(cfg) if c not in columns]
    if missing:
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no column(s) {missing}; its columns are "
                          f"{columns}: set data.image_column / question_column / answer_column, "
                          "or the fields of data.prompt_template / answer_template")
    return ds


def load_scored(cfg: DataConfig, split: str) -> datasets.Dataset:
    """The rows an evaluation scores: the split or, with data.streaming, the first
    data.eval_samples rows of its stream, read once and held in memory (every evaluation of the
    run scores them again)."""
    if not cfg.streaming:
        return load_split(cfg, split)
    if not cfg.eval_samples:
        raise ConfigError(f"scoring split {split!r} of a stream (data.streaming = true) needs data.eval_samples, "
                          "the number of its first rows to score, e.g. --set data.eval_samples=500")
    return head(load_split(cfg, split, streaming=True), cfg.eval_samples)


def _imagefolder_metadata(src: Path, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset | None:
    """An imagefolder split with a metadata.jsonl (<src>/<split>/metadata.jsonl), read as the JSON
    Lines file it is, each file_name made the path of its image in an "image" column (of
    `datasets.Image()`, as the builder makes it); None for any other layout, which the builder
    reads.

    The builder lists, resolves and fingerprints every image file on every load: 359 s warm and
    1364 s cold at 200,000 rows, where the metadata alone takes a second (docs/log.md). The rows
    are the same, in the metadata's order."""
    folder = src.resolve() / split.split("[")[0]
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        return None
    ds = datasets.load_dataset("json", data_files={folder.name: str(metadata)}, split=split, streaming=streaming)

    def paths(rows: dict) -> dict:
        return {"image": [str(folder / name) for name in rows["file_name"]]}
    ds = ds.map(paths, batched=True, remove_columns=["file_name"])
    # A JSON stream knows its columns' types only once read: it keeps the paths as strings,
    # which to_rgb reads as well.
    return ds if streaming else ds.cast_column("image", datasets.Image())


def head(ds: datasets.Dataset | datasets.IterableDataset, n: int) -> datasets.Dataset:
    """The first `n` rows as a Dataset: a stream's are read now and held in memory, images
    undecoded (for the checks before training, and the eval rows of a streamed dataset)."""
    if isinstance(ds, datasets.Dataset):
        return ds.select(range(min(n, len(ds))))
    ds = undecoded(ds)
    return datasets.Dataset.from_list(list(ds.take(n)), features=ds.features, split=ds.split)


def first_rows(ds: datasets.Dataset | datasets.IterableDataset, n: int) -> tuple[datasets.Dataset, list[int]]:
    """The first `n` rows to collate, as (a Dataset, their indices in it): a Dataset's own, so
    that a bad row among them is the one training meets (warned once, counted once); a stream's
    read into memory (head)."""
    first = ds if isinstance(ds, datasets.Dataset) else head(ds, n)
    return first, list(range(min(n, len(first))))


@dataclasses.dataclass
class Rows:
    """Rows already read, by their number: a step's share of a stream (steps.StreamSteps), which
    collate reads in place of a Dataset."""

    source: str  # identity(stream): names the rows in warnings and in the skipped-rows registry
    rows: dict[int, dict]


def identity(ds: datasets.Dataset | datasets.IterableDataset | Rows) -> str:
    """What names a split in the skipped-rows registry, the same in every process: a Dataset's
    content hash (the same split read twice is one split); a stream's name and split."""
    if isinstance(ds, Rows):
        return ds.source
    if isinstance(ds, datasets.IterableDataset):
        return f"stream {ds.info.dataset_name or ''}:{ds.split}"
    return ds._fingerprint


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
    media = [cfg.video_column] if cfg.video_column else [cfg.image_column]  # video data may hold no images
    if cfg.conversations_column:
        return [*media, cfg.conversations_column, *extra]
    aliases = {"question": cfg.question_column, "answer": cfg.answer_column}
    fields = _fields(cfg.prompt_template) | _fields(cfg.answer_template or "{answer}")
    return [*media, *sorted(aliases.get(f, f) for f in fields), *extra]


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
    "text": "..."}]}]: read as its text, an <image> marker where each image part is. Any other
    value is returned as it is."""
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
        return value
    if len(value) != 1:
        raise BadSample(f"a column holds {len(value)} chat messages, where one prompt or one answer is read; "
                        "multi-turn dialogs go in data.conversations_column")
    return content_text(value[0].get("content"))


def content_text(content: str | list[dict] | None) -> str:
    """A chat message's content as text: a string as it is; a list of parts (the HF chat layout)
    joined, each {"type": "image"} part an <image> marker and each {"type": "video"} part a <video>
    one, which place the row's next image or video there."""
    if isinstance(content, str) or content is None:
        return content or ""
    markers = {"image": IMAGE, "image_url": IMAGE, "video": VIDEO}
    pieces = [markers.get(part.get("type")) or part.get("text") or ""
              for part in content if part.get("type") in (*markers, "text")]
    return "\n".join(p for p in pieces if p)


# A conversation's turns in the two layouts datasets use: LLaVA's and ShareGPT's {"from", "value"}
# (human/gpt), and the HF chat layout's {"role", "content"} (user/assistant; content a string or parts).
USER, ASSISTANT = ("human", "user"), ("gpt", "assistant")


def dialog_of(cfg: DataConfig, row: dict) -> list[tuple[str, str]]:
    """The (user, assistant) exchanges of a row: one from the templates, or a conversation in
    data.conversations_column, either [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
    "value": ...}, ...] (LLaVA, ShareGPT) or [{"role": "user", "content": [{"type": "image"},
    {"type": "text", "text": ...}]}, {"role": "assistant", ...}, ...] (HF chat, TRL). A user
    turn keeps its <image> markers (image parts become markers), which place the row's images
    in order. A leading system turn is taken when it is data.system_prompt."""
    if not cfg.conversations_column:
        return [(prompt_of(cfg, row), answer_of(cfg, row))]
    turns = row[cfg.conversations_column] or []
    roles = [t.get("from", t.get("role")) for t in turns]
    texts = [t["value"] if "value" in t else content_text(t.get("content")) for t in turns]
    if roles[:1] == ["system"]:
        if texts[0].strip() != cfg.system_prompt.strip():
            raise BadSample(f"the conversation's system turn {texts[0]!r} is not data.system_prompt "
                            f"{cfg.system_prompt!r}; one system prompt serves the whole run: set data.system_prompt")
        roles, texts = roles[1:], texts[1:]
    if (not roles or len(roles) % 2 or not all(u in USER for u in roles[0::2])
            or not all(a in ASSISTANT for a in roles[1::2])):
        raise BadSample(f"data.conversations_column {cfg.conversations_column!r}: expected alternating "
                        f"user/assistant (human/gpt) turns, got {roles}")
    text = [(t or "").strip() for t in texts]
    if not all(text[1::2]):
        raise BadSample("an assistant turn has no text")
    return list(zip(text[0::2], text[1::2]))


def references_of(cfg: DataConfig, row: dict) -> list[str]:
    """The answers a prediction is scored against: data.references_column (a string, a list of
    strings, or VQAv2's list of {"answer": ...}), else the first exchange's answer."""
    if not cfg.references_column:
        return [dialog_of(cfg, row)[0][1]]
    value = row[cfg.references_column]
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v["answer"] if isinstance(v, dict) else str(v) for v in values]


def images_of(cfg: DataConfig, row: dict) -> list[Image.Image]:
    """The row's images as RGB, fully decoded: data.image_column holds one image or a list of
    them (TRL's and ShareGPT's "images"); none in video data without the column. A BadSample
    naming the file if any cannot be read: one bad image costs its row."""
    if cfg.video_column and cfg.image_column not in row:
        return []
    value = row[cfg.image_column]
    values = value if isinstance(value, list) else [value]
    if value is None or not values:
        raise BadSample(f"data.image_column {cfg.image_column!r} is {'null' if value is None else 'an empty list'}")
    images = []
    for i, one in enumerate(values):
        one = rooted(cfg, one)
        if one is None:
            raise BadSample(f"data.image_column {cfg.image_column!r}: image {i + 1} of {len(values)} is null")
        try:
            images.append(read_image(one))
        except BadSample as e:
            raise BadSample(f"{e} (image {i + 1} of {len(values)})" if len(values) > 1 else str(e)) from None
    return images


def rooted(cfg: DataConfig, value):
    """A relative path under data.image_root; anything else as it is."""
    if isinstance(value, str) and cfg.image_root and not value.startswith(("http://", "https://", "/")):
        return str(Path(cfg.image_root) / value)
    return value


DEFAULT_FPS = 2.0  # the rate a list of frames is taken at without data.video_fps: Qwen-VL's default sampling


def video_of(cfg: DataConfig, row: dict) -> Video:
    """The row's video (data.video_column): a file, decoded with PyAV, or a list of its frames (images
    or paths), sampled to at most data.video_frames frames evenly over its length, or a file at
    data.video_fps frames per second; a BadSample naming the file if it cannot be read."""
    value = rooted(cfg, row[cfg.video_column])
    if value is None or value == []:
        raise BadSample(f"data.video_column {cfg.video_column!r} is {'null' if value is None else 'an empty list'}")
    if isinstance(value, list):
        frames = [read_image(rooted(cfg, f)) for f in value]
        picked = evenly(len(frames), cfg.video_frames)
        rate = cfg.video_fps or DEFAULT_FPS
        return Video([frames[i] for i in picked], rate * len(picked) / len(frames))
    frames, rate = decode_video(value.get("path") if isinstance(value, dict) else value)
    wanted = cfg.video_frames
    if cfg.video_fps and rate:
        wanted = min(wanted, max(1, math.floor(len(frames) / rate * cfg.video_fps)))
    picked = evenly(len(frames), wanted)
    return Video([frames[i] for i in picked], (rate or DEFAULT_FPS) * len(picked) / len(frames))


def evenly(total: int, n: int) -> list[int]:
    """`n` (at most `total`) frame indices spread evenly from the first frame: Qwen-VL's sampling."""
    n = min(n, total)
    return [int(i * total / n) for i in range(n)]


def decode_video(path: str) -> tuple[list[Image.Image], float | None]:
    """Every frame of a video file as RGB, and its frame rate (None if the file does not say). PyAV
    (`av`) decodes it, imported here: only video data needs it."""
    try:
        import av
    except ImportError:
        raise ConfigError("data.video_column names video files, which need PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
            rate = float(stream.average_rate) if stream.average_rate else None
    except (OSError, ValueError, IndexError, av.FFmpegError) as e:
        raise BadSample(f"video {path} cannot be read: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample(f"video {path} has no frames")
    return frames, rate


def read_image(source: Image.Image | str | Path | dict) -> Image.Image:
    """to_rgb(source), or a BadSample naming the file and what is wrong with it."""
    name = source.get("path") if isinstance(source, dict) else source if isinstance(source, (str, Path)) else None
    try:
        return to_rgb(source)
    except IMAGE_ERRORS as e:
        raise BadSample(f"image {name or '(embedded bytes)'} cannot be read: {type(e).__name__}: {e}") from None


def sample_of(cfg: DataConfig, row: dict) -> tuple[list[Media], list[tuple[str, str]]]:
    """(media, exchanges) of one row: its images, then its video (data.video_column); a BadSample if
    either cannot be had, if the dialog's <image> and <video> markers do not match them (none: all go
    in the first turn; else one each, in order, in user turns) or, in preference data
    (data.rejected_column), if the rejected answer cannot be had."""
    media = images_of(cfg, row) + ([video_of(cfg, row)] if cfg.video_column else [])
    dialog = dialog_of(cfg, row)
    marked = [m for user, _ in dialog for m in MARKER.findall(user)]
    kinds = [VIDEO if isinstance(m, Video) else IMAGE for m in media]
    if marked and marked != kinds:
        raise BadSample(f"the row's markers {' '.join(marked)} do not match its media {' '.join(kinds)}: mark each "
                        "image and video where it goes, in order, or none (then they all go at the start of the "
                        "first user turn)")
    if any(MARKER.search(answer) for _, answer in dialog):
        raise BadSample("an answer holds an <image> or <video> marker: images and videos go in user turns")
    if cfg.rejected_column:
        rejected_of(cfg, row)
    return media, dialog


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
    than later inside the processor. Turned upright by its EXIF orientation; an animation's first
    frame. Transparency is composited on white: a bare convert("RGB") turns transparent pixels
    black (seed 002's convert_to_rgb). 16-bit and float greyscale is scaled to 8 bits first:
    convert() clips it at 255, and a 16-bit image comes out all white. CMYK goes through Pillow's
    conversion, its ICC profile unapplied, as transformers' processors read it.
    """
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=URL_TIMEOUT_S) as response:  # HTTP errors raise
            image = io.BytesIO(response.read())
    if not isinstance(image, Image.Image):
        # Pillow refuses an image of over 2 × Image.MAX_IMAGE_PIXELS (179M) pixels here, before
        # decoding a byte of it: a decompression bomb, or a 20,000 × 20,000 scan, is a bad sample.
        image = Image.open(image)
    image.load()  # also closes a file opened by path: no handle stays open per image; the first frame of a GIF
    if image.getexif().get(ORIENTATION, 1) != 1:
        # A camera stores a photo as its sensor saw it and an EXIF tag saying how to turn it;
        # viewers turn it, and so must we, or a question about "left" is about the right.
        image = ImageOps.exif_transpose(image)
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


def warn_unknown_answers(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, tokenizer,
                         rows: int = 1000) -> int:
    """Warn when answers (rejected ones too, in preference data) hold text the tokenizer cannot
    spell: it becomes the unknown token, or vanishes (a tokenizer without one drops what it does
    not know), and the model can only learn to write that. Returns how many of the first `rows`
    rows are affected."""
    # Answers only: decoding a thousand images to read strings would cost seconds and memory.
    media = [c for c in (cfg.image_column, cfg.video_column) if c in (ds.column_names or [])]
    texts = head(ds.remove_columns(media), rows)
    bad = []
    for i, row in enumerate(rows_of(texts, list(range(len(texts))))):
        try:
            # Preference data (DPO) learns to write the chosen answer and away from the rejected:
            # an answer it cannot spell is as wrong on either side.
            answers = [a for _, a in dialog_of(cfg, row)] + ([rejected_of(cfg, row)] if cfg.rejected_column else [])
        except BadSample:  # skipped (or refused) when its batch is collated, and counted there
            continue
        for answer in answers:
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


def undecoded(ds: datasets.Dataset | datasets.IterableDataset) -> datasets.Dataset | datasets.IterableDataset:
    """`ds` with its `datasets` images left undecoded ({"bytes", "path"}): to_rgb decodes them
    one by one, so an unreadable file costs its own row, not the whole batch read, and a row
    read only to be skipped (a resumed stream) costs no decoding."""
    for name, feature in (ds.features or {}).items():  # a JSON stream's are unknown: no images to cast
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))  # a schema change, no data rewritten
        elif (isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image)
              and feature.feature.decode):  # a list of images per row
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


def rows_of(ds: datasets.Dataset | Rows, indices: list[int]) -> list[dict]:
    """Rows as dicts, images undecoded (see undecoded)."""
    if isinstance(ds, Rows):
        return [ds.rows[i] for i in indices]
    columns = undecoded(ds)[indices]  # one columnar read
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def usable_samples(ds: datasets.Dataset | Rows, indices: list[int],
                   cfg: DataConfig) -> list[tuple[int, dict, list[Media], list[tuple[str, str]]]]:
    """(index, row, media, exchanges) for each of `ds[indices]` that can be used. A bad one is
    skipped with a warning (once per row, with the running count) or, with data.on_bad_sample =
    "fail", stops everything with a ConfigError naming the row, the problem and the fix."""
    samples = []
    for index, row in zip(indices, rows_of(ds, indices)):
        try:
            samples.append((index, row, *sample_of(cfg, row)))
        except BadSample as e:
            where = (f"row {index} of the stream" if isinstance(ds, Rows)
                     else f"row {index} of split {str(ds.split or '?')!r}")
            if cfg.on_bad_sample == "fail":
                raise ConfigError(f"{where}: {e}. Fix or remove the row, or set data.on_bad_sample = \"skip\" to "
                                  "train without it; `python -m minivlm.data --config <config>` lists every bad "
                                  "row") from None
            key = (identity(ds), index)
            if key not in _skipped:
                _skipped[key] = str(e)
                warnings.warn(f"skipped {where}: {e} ({len(_skipped)} bad row(s) skipped so far; "
                              "`python -m minivlm.data --config <config>` lists them all)")
    return samples


def check_split(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig,
                chunk: int = 64) -> tuple[list[tuple[int, str]], int]:
    """((row, reason) for every row of `ds` that training would skip, how many rows were read):
    each image opened and decoded, each answer read. Nothing is kept in memory but the current
    chunk. A stream is read through in its order, its rows numbered from 0."""
    if isinstance(ds, datasets.IterableDataset):
        numbered = enumerate(undecoded(ds))
    else:
        chunks = (list(range(start, min(start + chunk, len(ds)))) for start in range(0, len(ds), chunk))
        numbered = (pair for indices in chunks for pair in zip(indices, rows_of(ds, indices)))
    bad, read = [], 0
    for index, row in numbered:
        read += 1
        try:
            sample_of(cfg, row)
        except BadSample as e:
            bad.append((index, str(e)))
    return bad, read


def main(argv: list[str] | None = None) -> int:
    """`python -m minivlm.data --config C [--split S]`: list the rows training would skip."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        split = args.split or cfg.data.train_split
        ds = load_split(cfg.data, split, streaming=cfg.data.streaming)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    bad, read = check_split(ds, cfg.data)
    for row, reason in bad:
        print(f"row {row}: {reason}")
    print(f"{len(bad)} bad row(s) of {read} in split {split!r}" if bad else f"all {read} rows of split "
          f"{split!r} are usable")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
