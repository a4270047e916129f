"""The bad-input corpus: every mistake in a config, a dataset or a command line ends in one line
that names the problem (and the fix), never a traceback or a silently wrong run.

Each case is in-process and cheap: a config dict, a one-row dataset, a file or a path. The
`error` helper asserts the one-line shape; each case asserts what the line names.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.pretrain_base import make_processor
from minivlm.config import ConfigError, DataConfig, check_output_path, from_dict
from minivlm.batches import collate
from minivlm.data import check_split, load_split, main as check_data_main, to_rgb
from minivlm.models import paligemma

ROOT = Path(__file__).resolve().parents[1]


def error(call) -> str:
    """The message of the ConfigError `call()` raises, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- config: wrong values of the keys this corpus owns ------------------------------------------

CONFIG_CASES = {
    "lora.targets bad regex": ({"lora": {"targets": ["re:("]}}, r"lora.targets: 're:\(' is not a valid regular "
                               r"expression \(missing \), unterminated subpattern"),
    "lora.skip bad regex": ({"lora": {"skip": ["re:[a-"]}}, r"lora.skip: 're:\[a-' is not a valid regular"),
    "quant.skip bad regex": ({"quant": {"skip": ["vision_tower", "re:*x"]}}, r"quant.skip: 're:\*x' .*nothing to "
                             "repeat"),
    "lora.train_modules bad regex": ({"lora": {"train_modules": ["re:(?P<"]}}, r"lora.train_modules: 're:\(\?P<'"),
    "on_bad_sample unknown": ({"data": {"on_bad_sample": "ignore"}}, r"data.on_bad_sample = 'ignore' is not one "
                              r"of \['skip', 'fail'\]"),
    "trust_remote_code a string": ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code must be true "
                                   "or false"),
    "max_nonfinite_steps 0": ({"train": {"max_nonfinite_steps": 0}}, r"train.max_nonfinite_steps = 0 must be >= 1"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_mistake_is_one_line(case):
    raw, expected = CONFIG_CASES[case]
    assert re.search(expected, error(lambda: from_dict(raw)))


# --- rows that cannot be trained on: each listed by check_split, refused by "fail" ---------------

def write_png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path)
    return path


def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def broken_png_chunk(path: Path) -> None:
    data = bytearray((write_png(path)).read_bytes())
    data[30:40] = b"\xff" * 10  # inside IHDR: its CRC no longer matches
    path.write_bytes(bytes(data))


# Each: (how to make the row's image in `tmp`, row fields, what the reason names).
ROW_CASES = {
    "missing image file": (None, {"image": "{tmp}/gone.png"}, r"image .*gone.png cannot be read: "
                           r"FileNotFoundError"),
    "corrupt png bytes": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), {},
                          r"bad.png cannot be read: OSError: Truncated File Read"),
    "truncated jpeg": (lambda p: p.write_bytes(jpeg_bytes()[:400]), {}, r"bad.png cannot be read: OSError: "
                       r"Truncated File Read"),
    "zero-byte file": (lambda p: p.write_bytes(b""), {}, r"bad.png cannot be read: UnidentifiedImageError"),
    "text file named .png": (lambda p: p.write_text("not an image"), {}, "bad.png cannot be read"),
    "png with a broken chunk": (broken_png_chunk, {}, r"bad.png cannot be read: \w+"),
    "image path is a folder": (lambda p: p.mkdir(), {}, r"bad.png cannot be read: IsADirectoryError"),
    # 20,000 × 20,000 (1.2 GB as RGB) in a 48 KB PNG: refused before a byte is decoded.
    "decompression bomb": (lambda p: Image.new("1", (20_000, 20_000)).save(p), {},
                           r"bad.png cannot be read: DecompressionBombError: Image size \(400000000 pixels\) "
                           r"exceeds limit"),
    "null image": (None, {"image": None}, r"data.image_column 'image' is null"),
    # TRL's layout, a list of images a row: a corrupt one is that row's, not its batch's.
    "corrupt image in a list column": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
                                       {"image": ["{tmp}/bad.png"]}, r"bad.png cannot be read: OSError"),
    "URL image offline": (None, {"image": "http://127.0.0.1:9/x.png"}, r"http://127.0.0.1:9/x.png cannot be read: "
                          r"URLError.*refused"),
    "null answer": (write_png, {"answer": None}, "the answer is null"),
    "empty answer": (write_png, {"answer": ""}, "the answer is empty"),
    "blank answer": (write_png, {"answer": "   "}, "the answer is empty"),
    "empty answer list": (write_png, {"answer": []}, "the answer is null"),
    "conversation with wrong roles": (write_png, {"conversations": [{"from": "gpt", "value": "a"},
                                                                    {"from": "human", "value": "q"}]},
                                      r"expected alternating user/assistant \(human/gpt\) turns, got \['gpt', 'human'\]"),
    "conversation with an odd turn": (write_png, {"conversations": [{"from": "human", "value": "q"}]},
                                      r"expected alternating user/assistant \(human/gpt\) turns, got \['human'\]"),
    "conversation with an empty answer": (write_png, {"conversations": [{"from": "human", "value": "q"},
                                                                        {"from": "gpt", "value": ""}]},
                                          "an assistant turn has no text"),
}


def one_bad_row(tmp_path: Path, case: str) -> tuple[DataConfig, Path]:
    """A two-row JSON Lines dataset: row 0 good, row 1 the case's bad row."""
    make, fields, _ = ROW_CASES[case]
    good = write_png(tmp_path / "good.png")
    if make:
        make(tmp_path / "bad.png")
    conversations = "conversations" in fields
    rows = [{"image": str(good), "question": "what", "answer": "red"}, {"image": str(tmp_path / "bad.png"),
                                                                        "question": "what", "answer": "red"}]
    if conversations:
        for row in rows:
            row["conversations"] = [{"from": "human", "value": "what"}, {"from": "gpt", "value": "red"}]
    rows[1].update({k: v.format(tmp=tmp_path) if isinstance(v, str) else
                    [x.format(tmp=tmp_path) for x in v] if k == "image" and isinstance(v, list) else v
                    for k, v in fields.items()})
    if isinstance(rows[1]["answer"], list):  # one type per column
        rows[0]["answer"] = ["red"]
    if isinstance(rows[1]["image"], list):
        rows[0]["image"] = [rows[0]["image"]]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(dataset=str(path), conversations_column="conversations" if conversations else ""), path


@pytest.mark.parametrize("case", ROW_CASES)
def test_bad_row_is_listed_and_refused_by_fail(case, tmp_path):
    cfg, _ = one_bad_row(tmp_path, case)
    ds = load_split(cfg, "train")
    [(row, reason)], _ = check_split(ds, cfg)
    assert row == 1 and re.search(ROW_CASES[case][2], reason), reason
    cfg.on_bad_sample = "fail"
    message = error(lambda: collate(ds, [0, 1], cfg, paligemma, make_processor()))
    assert message.startswith("row 1 of split 'train': ") and re.search(ROW_CASES[case][2], message)
    assert 'set data.on_bad_sample = "skip"' in message and "python -m minivlm.data" in message


def test_bad_rows_are_skipped_counted_and_an_all_bad_batch_is_empty(tmp_path):
    cfg, _ = one_bad_row(tmp_path, "truncated jpeg")
    ds, processor = load_split(cfg, "train"), make_processor()
    with pytest.warns(UserWarning, match=r"skipped row 1 of split 'train': image .*bad.png cannot be read.*"
                                         r"\(1 bad row\(s\) skipped so far"):
        batch = collate(ds, [0, 1], cfg, paligemma, processor)
    assert batch["input_ids"].shape[0] == 1  # the good row trains
    empty = collate(ds, [1], cfg, paligemma, processor)  # warned once per row, not once per epoch
    # What the loop reads of a batch: no answer tokens (so the window is skipped), no tokens.
    assert int((empty["labels"][:, 1:] != -100).sum()) == 0 and int(empty["attention_mask"].sum()) == 0


def test_check_data_command_lists_bad_rows(tmp_path, capsys):
    cfg, data = one_bad_row(tmp_path, "zero-byte file")
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndataset = "{data}"\n')
    assert check_data_main(["--config", str(config)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("row 1: image ") and out[-1] == "1 bad row(s) of 2 in split 'train'"


# --- datasets and splits that cannot be loaded ---------------------------------------------------

def jsonl(tmp_path: Path, text: str) -> str:
    (tmp_path / "d.jsonl").write_text(text)
    return str(tmp_path / "d.jsonl")


LOAD_CASES = {
    "jsonl with a broken line": (lambda t: DataConfig(dataset=jsonl(t, '{"image": "a.png", "question": "q", '
                                                     '"answer": "a"}\n{"image": broken\n')), "train",
                                 r"d.jsonl' cannot be read: .*JSON parse error.*one complete JSON object per line"),
    "parquet missing": (lambda t: DataConfig(dataset=str(t / "none.parquet")), "train",
                        r"cannot load split 'train' of data.dataset = '.*none.parquet': Unable to find"),
    "eval split that does not exist": (lambda t: DataConfig(dataset=jsonl(t, '{"image": "a", "question": "q", '
                                                            '"answer": "a"}\n')), "validation",
                                       r"cannot load split 'validation'.*Unknown split"),
    "answer column missing": (lambda t: DataConfig(dataset=jsonl(t, '{"image": "a", "question": "q"}\n')), "train",
                              r"has no column\(s\) \['answer'\]"),
    "image column misnamed": (lambda t: DataConfig(dataset=jsonl(t, '{"img": "a", "question": "q", "answer": '
                                                   '"a"}\n')), "train", r"has no column\(s\) \['image'\]"),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_unloadable_split_is_one_line(case, tmp_path):
    make, split, expected = LOAD_CASES[case]
    cfg = make(tmp_path)
    assert re.search(expected, error(lambda: load_split(cfg, split)))


def test_wrong_image_root_names_the_joined_path(tmp_path):
    write_png(tmp_path / "a.png")
    cfg = DataConfig(dataset=jsonl(tmp_path, '{"image": "a.png", "question": "q", "answer": "a"}\n'),
                     image_root=str(tmp_path / "elsewhere"))
    [(row, reason)], _ = check_split(load_split(cfg, "train"), cfg)
    assert row == 0 and re.search(r"image .*elsewhere/a.png cannot be read: FileNotFoundError", reason)


# --- output paths and images on the command line -------------------------------------------------

def test_output_paths_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a directory; give a file name" in error(lambda: check_output_path(tmp_path, "--out", directory=False))
    assert "is an existing file" in error(lambda: check_output_path(tmp_path / "file", "--out", directory=True))
    assert re.search(r"file is a file, not a directory", error(
        lambda: check_output_path(tmp_path / "file" / "a.jsonl", "--out", directory=False)))
    assert re.search(r"cannot write in /proc", error(lambda: check_output_path("/proc/x/y", "--out", directory=True)))
    assert check_output_path(tmp_path / "new" / "deeper", "--out", directory=True)  # created when written


def infer(tmp_path: Path, *args: str) -> str:
    """infer.py's error line; the model path does not exist, so reaching the model load would fail otherwise."""
    sys.path.insert(0, str(ROOT))
    from minivlm.cli import infer as infer_cli
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nname_or_path = "{tmp_path / "no-model"}"\n')
    with pytest.raises(SystemExit) as info:
        infer_cli.main(["--config", str(config), "--prompt", "what", *args])
    return str(info.value.code)


@pytest.mark.parametrize("case", ["truncated", "missing", "empty folder", "out is a folder"])
def test_infer_refuses_before_the_model_loads(case, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(jpeg_bytes()[:300])
    (tmp_path / "empty").mkdir()
    args, expected = {
        "truncated": (["--image", str(bad)], r"^error: image .*bad.jpg cannot be read: OSError: Truncated "
                      "File Read$"),
        "missing": (["--image", str(tmp_path / "nope.png")], r"^error: --image .*nope.png not found$"),
        "empty folder": (["--image", str(tmp_path / "empty")], r"^error: no image files \(.*\) in .*empty$"),
        "out is a folder": (["--image", str(bad), "--out", str(tmp_path)], r"^error: --out .* is a directory"),
    }[case]
    message = infer(tmp_path, *args)
    assert "\n" not in message and re.search(expected, message), message


# --- images that are readable but unusual: faithful RGB, never all white or black ----------------

def sixteen_bit_gradient() -> Image.Image:
    return Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16))  # mode I;16, 0..65535


ODD_IMAGES = {
    "16-bit PNG (I;16)": lambda p: sixteen_bit_gradient().save(p) or Image.open(p),
    "32-bit int (I)": lambda p: sixteen_bit_gradient().convert("I"),
    "float (F)": lambda p: Image.fromarray((np.arange(256, dtype=np.float32) / 255).reshape(16, 16)),
    "palette (P)": lambda p: Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P"),
    "grey with alpha (LA)": lambda p: Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("LA"),
}


@pytest.mark.parametrize("case", ODD_IMAGES)
def test_unusual_modes_keep_their_gradient(case, tmp_path):
    rgb = np.asarray(to_rgb(ODD_IMAGES[case](tmp_path / "x.png")))
    assert rgb.shape == (16, 16, 3) and rgb[0, 0].max() <= 1 and rgb[-1, -1].min() >= 254  # black ... white
    assert len(np.unique(rgb[..., 0])) > 200  # a gradient, not a clipped two-tone image


def test_infer_folder_streams_images(tmp_path):
    """300 images listed and batched with file handles bounded (the old code held one per image)."""
    sys.path.insert(0, str(ROOT))
    from minivlm.cli.infer import image_batches, image_files
    for i in range(300):
        write_png(tmp_path / f"{i:03}.png")
    fds = lambda: len(list(Path("/proc/self/fd").iterdir()))  # noqa: E731
    before, seen = fds(), 0
    for batch in image_batches(image_files(tmp_path)):
        assert len(batch) <= 16 and fds() <= before + 2
        seen += len(batch)
    assert seen == 300


# --- security: nothing read from disk goes through pickle ----------------------------------------

PRODUCT = [*ROOT.glob("minivlm/**/*.py"), ROOT / "train.py", ROOT / "infer.py", *ROOT.glob("demo/*.py")]


def test_no_pickle_in_the_product():
    unsafe = []
    for path in PRODUCT:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or re.search(r"\bimport pickle\b|\bpickle\.",
                                                                                       line):
                unsafe.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert len(PRODUCT) > 20 and not unsafe, unsafe

