"""End to end through the CLIs: train.py, then infer.py; the seed config on a tiny model; bad input."""

from __future__ import annotations

import json
import string
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minivlm.cli import infer
from minivlm.cli import train
from conftest import ROOT, count_steps, write_split
from minivlm.objectives import sft


def hand_scored(rows: list[dict]) -> float:
    """Exact match after lower-casing and dropping punctuation and extra spaces, without minivlm.metrics."""
    def norm(text: str) -> str:
        return " ".join("".join(c for c in text.lower() if c not in string.punctuation).split())
    return sum(norm(r["answer"]) in {norm(x) for x in r["references"]} for r in rows) / len(rows)


def test_train_then_infer(tiny_paligemma, shapes_data, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text((ROOT / "configs/demo.toml").read_text())
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3", "train.batch_size=4"]
    metrics = train.main(["--config", str(config), *sum((["--set", s] for s in sets), [])])
    assert metrics["steps"] == 3
    saved = json.loads((tmp_path / "run/metrics.json").read_text())
    assert {"accuracy_before", "accuracy_after", "train_seconds", "trainable_params", "total_params"} <= saved.keys()
    assert 0 < saved["trainable_params"] < saved["total_params"]
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    # Step 0 is the evaluation before training, so the curves start where training did.
    assert log[0]["step"] == 0 and log[0]["accuracy"] == metrics["accuracy_before"] and log[0]["val_loss"] > 0
    assert [r["step"] for r in log[1:]] == [1, 2, 3] and all(r["loss"] > 0 for r in log[1:])

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    common = ["--config", str(config), "--checkpoint", str(tmp_path / "run/last"),
              "--set", f"model.name_or_path={tiny_paligemma}", "--set", f"data.dataset={shapes_data}"]
    one = infer.main([*common, "--image", str(image), "--prompt", "what color is the shape"])
    assert len(one) == 1 and isinstance(one[0]["answer"], str)
    folder = infer.main([*common, "--image", str(shapes_data / "test"), "--prompt", "what shape is it"])
    assert len(folder) == 8 and all(r["image"].endswith(".png") for r in folder)
    assert folder[0]["answer"] == infer.main([*common, "--image", folder[0]["image"], "--prompt", "what shape is it"])[0]["answer"]
    split = infer.main([*common, "--split", "test", "--eval", "--out", str(tmp_path / "answers.jsonl")])
    lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert lines == split and len(lines) == 8 and all(r["references"] for r in lines)
    # The scores train.py reported are those of the answers infer.py gives with and without the
    # adapter, scored here by hand.
    base = infer.main([c for c in common if c not in ("--checkpoint", str(tmp_path / "run/last"))] + ["--split", "test"])
    assert [r["references"] for r in base] == [r["references"] for r in split]
    assert metrics["accuracy_after"] == hand_scored(split) and metrics["accuracy_before"] == hand_scored(base)
    with pytest.raises(SystemExit, match="--eval needs --split"):
        infer.main([*common, "--image", str(image), "--prompt", "x", "--eval"])


def test_seed_config_runs_on_a_tiny_paligemma(tiny_paligemma, tmp_path):
    """configs/paligemma.toml (seed 004: bf16, 4-bit, checkpointing, VQAv2 columns), paths overridden."""
    data = tmp_path / "vqa"
    write_split(data / "train", 12, seed=3)
    meta = data / "train/metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({"file_name": r["file_name"], "question": r["question"],
                                        "multiple_choice_answer": r["answer"],
                                        "answers": [{"answer": r["answer"], "answer_id": i} for i in range(10)]})
                            + "\n" for r in rows))
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={data}", "data.train_split=train",
            'data.eval_split=""', f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.device=cpu"]
    metrics = train.main(["--config", str(ROOT / "configs/paligemma.toml"), *sum((["--set", s] for s in sets), [])])
    assert metrics["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    adapter = load_file(tmp_path / "run/last/adapter.safetensors")
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapter.items())  # adapters changed
    state = json.loads((tmp_path / "run/last/state.json").read_text())
    assert state["config"]["train"]["bf16"] and state["config"]["train"]["gradient_checkpointing"]


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[lora]\nr = 0\n')
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: lora.r = 0 must be > 0 (the adapter rank)"


def test_cli_refuses_to_overwrite_and_resumes(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", 'data.eval_split=""',
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.optimizer=adamw", "train.eval_every=0"]
    args = ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]
    train.main(args)
    saved = (tmp_path / "run/last/adapter.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a checkpoint; continue it with --resume"):
        train.main(args)
    assert (tmp_path / "run/last/adapter.safetensors").read_bytes() == saved  # nothing lost
    trained = count_steps(monkeypatch, sft)
    metrics = train.main(args + ["--set", "train.max_steps=4", "--resume"])
    assert metrics["steps"] == 4 and len(trained) == 2  # steps 3 and 4
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        train.main(args + ["--resume", str(tmp_path / "nowhere")])


def test_a_streamed_jsonl_trains_evaluates_and_lists_its_bad_rows(tiny_paligemma, shapes_data, tmp_path, capsys):
    """data.streaming on a JSON Lines file (a stream that learns its columns from its first row),
    read by a DataLoader worker: the run trains its steps, scores data.eval_samples rows held in
    memory, counts the bad row it met, and its save records where the stream goes on;
    `python -m minivlm.data` lists that row by its place in the stream."""
    rows = [json.loads(line) for line in (shapes_data / "train/metadata.jsonl").read_text().splitlines()]
    rows[2]["file_name"] = "missing.png"
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"image": r["file_name"], "question": r["question"],
                                                             "answer": r["answer"]}) + "\n" for r in rows))
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={tmp_path / 'data.jsonl'}",
            f"data.image_root={shapes_data / 'train'}", "data.streaming=true", "data.shuffle_buffer=0",
            "data.workers=1", "data.eval_split=train", "data.eval_samples=5", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3", "train.batch_size=4", "train.eval_every=0"]
    argv = ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]
    metrics = train.main(argv)
    assert metrics["steps"] == 3 and "accuracy_after" in metrics
    out = capsys.readouterr().out
    assert "accuracy before training: " in out and " on 4 held-out samples" in out  # 5 rows, one bad
    assert "skipped 1 bad row(s)" in out  # met by the worker, counted by the training process
    state = json.loads((tmp_path / "run/last/state.json").read_text())
    assert state["loop"]["stream"] == {"epoch": 0, "row": 12, "read": 12}  # 3 steps of 4 rows
    train.main([*argv, "--set", "train.max_steps=4", "--resume"])
    assert "step 3 of 4, the stream read on from row 12 of epoch 0" in capsys.readouterr().out
    assert json.loads((tmp_path / "run/last/state.json").read_text())["loop"]["stream"]["row"] == 16
    answered = infer.main([*argv, "--checkpoint", str(tmp_path / "run/last"), "--split", "train"])
    assert [row["references"] for row in answered] == [[r["answer"]] for r in rows[:5] if r is not rows[2]]
    capsys.readouterr()
    from minivlm.data import main as check_data
    assert check_data(["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]) == 1
    listed = capsys.readouterr().out
    assert listed.startswith("row 2: image ") and listed.rstrip().endswith(f"1 bad row(s) of {len(rows)} in split 'train'")
