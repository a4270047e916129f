"""train.py refuses, in one line and before the model loads, what would fail later or corrupt a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minivlm.build
import minivlm.loop
from minivlm.cli import train
from conftest import ROOT
from minivlm.config import load_config, to_dict


def args(tiny_paligemma, shapes_data, output_dir, *extra: str) -> list[str]:
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", 'data.eval_split=""',
            f"train.output_dir={output_dir}", "train.max_steps=3", "train.batch_size=4", "train.optimizer=adamw",
            "train.eval_every=0", "train.device=cpu", *extra]
    return ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]


@pytest.fixture
def no_model_load(monkeypatch):
    """build() fails the test: every refusal here must come before the model is read."""
    def build(*a, **kw):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(minivlm.build, "build", build)


def fake_checkpoint(argv: list[str], step: int) -> Path:
    """A save of `step` as train.py would leave it, with the config of `argv` (no weights needed:
    the checks read state.json only)."""
    parsed = train.parse_args(argv)
    cfg = load_config(parsed.config, parsed.set)
    directory = Path(cfg.train.output_dir) / "checkpoints" / f"step-{step:08d}"
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps({"step": step, "saved": 1, "config": to_dict(cfg), "loop": {}}))
    (Path(cfg.train.output_dir) / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return directory


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_refuses_a_config_that_changes_the_math_listing_each_key(tiny_paligemma, shapes_data, tmp_path,
                                                                        no_model_load):
    run = tmp_path / "run"
    fake_checkpoint(args(tiny_paligemma, shapes_data, run), step=2)
    before = files_of(run)
    changed = args(tiny_paligemma, shapes_data, run, "lora.r=16", "train.lr=1e-4", "data.max_length=99")
    with pytest.raises(SystemExit) as e:
        train.main(changed + ["--resume"])
    message = str(e.value.code)
    assert message.startswith("error: --resume:") and "\n" not in message
    assert "lora.r: 8 -> 16" in message and "train.lr: 0.003 -> 0.0001" in message
    assert "data.max_length: 64 -> 99" in message
    assert files_of(run) == before


def test_resume_allows_what_does_not_change_the_math(tiny_paligemma, shapes_data, tmp_path, no_model_load, capsys):
    run = tmp_path / "run"
    fake_checkpoint(args(tiny_paligemma, shapes_data, run), step=2)
    free = args(tiny_paligemma, shapes_data, run, "train.max_steps=5", "train.save_every=1", "train.keep_checkpoints=0",
                "train.max_new_tokens=8", "data.workers=1")
    with pytest.raises(AssertionError, match="the model was loaded"):  # every check passed
        train.main(free + ["--resume"])
    out = capsys.readouterr().out
    assert "cosine learning-rate schedule is recomputed for 5 steps" in out
    assert f"resuming from {run.relative_to(Path.cwd()) if run.is_relative_to(Path.cwd()) else run}" \
           f"/checkpoints/step-00000002: step 2 of 5" in out  # what it resumes, as the Trainer says


def test_resume_at_the_end_does_nothing_and_exits_0(tiny_paligemma, shapes_data, tmp_path, no_model_load, capsys):
    """A run whose end is whole (last at the final save, metrics.json of its steps, curves.png)."""
    from PIL import Image
    run = tmp_path / "run"
    save = fake_checkpoint(args(tiny_paligemma, shapes_data, run), step=3)
    (run / "last").symlink_to(save.relative_to(run))
    (run / "metrics.json").write_text('{"steps": 3, "final_loss": 1.0}')
    Image.new("RGB", (8, 8)).save(run / "curves.png")
    before = files_of(run)
    assert train.main(args(tiny_paligemma, shapes_data, run) + ["--resume"]) == {"steps": 3, "nothing_to_do": True}
    assert "nothing to do" in capsys.readouterr().out
    assert files_of(run) == before and (run / "last").resolve() == save  # nothing changed


def test_nonfinite_loss_skips_steps_then_stops_saving_nothing(tiny_paligemma, shapes_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny_paligemma, shapes_data, run, "train.lr=1e30", "train.max_steps=8",
                        "train.max_nonfinite_steps=2"))
    message = str(e.value.code)
    assert "NaN or inf for 2 steps in a row" in message and "train.lr = 1e+30 too high" in message
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log if "skipped" in r] == ["non-finite loss"] * 2  # counted and logged
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)


def test_a_run_without_a_finite_loss_stores_null_not_nan(tiny_paligemma, shapes_data, tmp_path, monkeypatch, capsys):
    def train_without_a_finite_step(cfg, built, *a, **kw):
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "log.jsonl").write_text("")  # what a run of only skipped steps logs
        return {"step": 3, "loss": float("nan"), "train_seconds": 0.0, "best_metric": 0.0, "stopped_early": False,
                "signal": None}
    monkeypatch.setattr(minivlm.loop, "train", train_without_a_finite_step)
    train.main(args(tiny_paligemma, shapes_data, tmp_path / "run"))
    assert json.loads((tmp_path / "run/metrics.json").read_text())["final_loss"] is None  # valid JSON, no NaN
    assert "no step of this run had a finite loss" in capsys.readouterr().out


@pytest.mark.parametrize("case, extra, expected", [
    ("output dir is a file", ["train.output_dir={file}"], "is a file; set train.output_dir to a directory"),
    ("output dir under a file", ["train.output_dir={file}/run"], "cannot be created: "),
    ("train split missing", ["data.train_split=nope"], "cannot load split 'nope'"),
    ("train split empty", ["data.train_split=train[:0]"], "corresponds to no data"),
    ("eval split missing", ["data.eval_split=nope"], "cannot load split 'nope'"),
    ("a stream sliced", ["data.streaming=true", "train.max_steps=2", "data.eval_samples=4", "data.train_split=train[:10]"],
     "a stream (data.streaming = true) cannot be sliced"),
    ("a streamed column missing", ["data.streaming=true", "train.max_steps=2", "data.eval_samples=4",
                                   "data.answer_column=nope"], "has no column(s) ['nope']"),
    ("answer column missing", ["data.answer_column=nope"], "has no column(s) ['nope']"),
    ("max_length drops every sample", ["data.max_length=8"], "data.max_length = 8 is shorter than every sample"),
    ("relative model path missing", ["model.name_or_path=./nope"], "not found: "),
    ("absolute model path missing", ["model.name_or_path=/nonexistent/model"], "not found: /nonexistent/model"),
])
def test_fails_fast_in_one_line(case, extra, expected, tiny_paligemma, shapes_data, tmp_path, no_model_load):
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny_paligemma, shapes_data, tmp_path / "run", *[x.format(file=file) for x in extra]))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and expected in message, message


def test_unwritable_output_dir_and_cuda_without_a_gpu(tiny_paligemma, shapes_data, tmp_path, no_model_load,
                                                    monkeypatch):
    # As root, chmod cannot make a directory unwritable: os.access stands in for a read-only disk.
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit, match="is not writable"):
        train.main(args(tiny_paligemma, shapes_data, tmp_path / "run"))
    monkeypatch.undo()
    monkeypatch.setattr(minivlm.build, "build", lambda *a, **kw: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no usable CUDA GPU"):
        train.main(args(tiny_paligemma, shapes_data, tmp_path / "run", "train.device=cuda"))


def test_uncached_hub_id_fails_at_once_offline(tiny_paligemma, shapes_data, tmp_path, no_model_load, monkeypatch):
    monkeypatch.setattr(minivlm.build.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="not in the Hugging Face cache"):
        train.main(args(tiny_paligemma, shapes_data, tmp_path / "run", "model.name_or_path=nobody/no-such-model"))


@pytest.mark.parametrize("script", ["train", "minivlm.export"])
def test_help_and_config_errors_import_no_torch(tmp_path, script):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nr = 0\n")
    extra = "" if script == "train" else ", '--checkpoint', 'x', '--out', 'y'"
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {script} as script\n"
             f"for argv in (['--help'], ['--config', {str(bad)!r}{extra}]):\n"
             "    try: script.main(argv)\n"
             "    except SystemExit as e: print(e.code)\n"
             "heavy = sorted({'torch', 'transformers', 'datasets', 'bitsandbytes'} & set(sys.modules))\n"
             "print('imported:', heavy)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "error: lora.r = 0 must be > 0" in proc.stdout
    assert proc.stdout.strip().endswith("imported: []"), proc.stdout + proc.stderr


@pytest.mark.parametrize("mode, workers", [("skip", 0), ("skip", 1), ("fail", 0)])
def test_a_bad_image_mid_run_is_skipped_and_reported_or_stops_in_one_line(tiny_paligemma, tmp_path, mode, workers,
                                                                          capsys):
    """Skipped and counted at the end, also when a DataLoader worker met it (data.workers = 1)."""
    from conftest import write_split
    data = tmp_path / "data"
    write_split(data / "train", 24, seed=1)
    bad = sorted((data / "train").glob("*.png"))[20]  # past the rows train.py reads before training
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header reads, the pixels do not
    argv = args(tiny_paligemma, data, tmp_path / "run", "train.max_steps=6", f'data.on_bad_sample="{mode}"',
                f"data.workers={workers}")
    if mode == "skip":
        metrics = train.main(argv)
        assert metrics["steps"] == 6
        assert "skipped 1 bad row(s)" in capsys.readouterr().out
    else:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        message = str(e.value.code)
        assert message.startswith("error: ") and bad.name in message and "Traceback" not in message
        assert "continue with: python train.py" in message


def test_resume_completes_the_end_a_crash_cut_short_and_says_what(tiny_paligemma, shapes_data, tmp_path, monkeypatch,
                                                                   capsys):
    """A run killed after its final save but before the rest of its end: `last` still at the save
    before, a prune half done, no metrics.json, a curves.png cut short. --resume trains nothing,
    does all of that, says so; and measures the scores before training no second time."""
    import minivlm.evaluate
    run = tmp_path / "run"
    argv = args(tiny_paligemma, shapes_data, run, "data.eval_split=test", "data.eval_samples=4", "train.max_steps=4",
                "train.save_every=2", "train.max_new_tokens=2")
    whole = train.main(argv)
    expected_metrics, expected_png = (run / "metrics.json").read_text(), (run / "curves.png").read_bytes()
    saves = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in saves] == ["step-00000002", "step-00000004"]
    (run / "last").unlink()
    (run / "last").symlink_to("checkpoints/step-00000002")
    (run / "checkpoints/step-00000000.del").mkdir()  # a prune that crashed
    (run / "metrics.json").unlink()
    (run / "curves.png").write_bytes(expected_png[:100])
    evaluations, real_report = [], minivlm.evaluate.report
    monkeypatch.setattr(minivlm.evaluate, "report", lambda when, *a: evaluations.append(when) or real_report(when, *a))
    capsys.readouterr()

    completed = train.main(argv + ["--resume"])
    out = capsys.readouterr().out
    assert "training was done at step 4" in out and "pointed last at step-00000004" in out
    assert "removed the leftover checkpoints/step-00000000.del" in out and "wrote metrics.json and curves.png" in out
    assert evaluations == ["after"]  # the scores before training came from before.json
    assert (run / "last").resolve().name == "step-00000004" and not (run / "checkpoints/step-00000000.del").exists()
    timing = ("train_seconds",)
    assert {k: v for k, v in completed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert json.loads((run / "metrics.json").read_text()).keys() == json.loads(expected_metrics).keys()
    from PIL import Image
    with Image.open(run / "curves.png") as png:
        png.load()  # whole again
    files = files_of(run)
    assert train.main(argv + ["--resume"]) == {"steps": 4, "nothing_to_do": True}  # now whole: nothing changes
    assert files_of(run) == files
