"""A whole short run, SIGKILLed at its filesystem mutations (training, saves, evaluations, pruning,
the final writes), then continued as a user would: `--resume` where a save exists, else the same
command again. Each must end as the uninterrupted run ends: the same log, `last` and `best` to
the byte, the same saves, the same metrics.json and a readable curves.png, no leftovers.

The kills come from tests/killed_run.py (an audit hook that kills the process just before its
Nth mutation), in a forked child running train.main. Every mutation from the final save's on is killed at, where a run's end can be cut
short; before it, a spread (the saves and evaluations before repeat what the spread covers).
`KILL_EVERY=1 pytest tests/test_crash.py` kills at every one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image

import killed_run
from minivlm.cli import train
from conftest import ROOT
from minivlm.checkpoint import latest_checkpoint

TIMING = {"seconds", "samples_per_s", "tokens_per_s", "mfu", "train_seconds"}  # differ run to run


def command(model: Path, data: Path, out: Path) -> list[str]:
    """train.py's arguments for 6 steps, a save and an evaluation every 2, 1 save kept (and the
    best): every kind of write a run makes."""
    sets = [f"model.name_or_path={model}", f"data.dataset={data}", "data.eval_split=test", "data.eval_samples=4",
            f"train.output_dir={out}", "train.max_steps=6", "train.save_every=2", "train.eval_every=2",
            "train.keep_checkpoints=1", "train.batch_size=4", "train.optimizer=adamw", "train.device=cpu",
            "train.max_new_tokens=2"]
    return ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]


def launch(argv: list[str], out: Path, kill_at: int = 0) -> tuple[int, str]:
    """train.main(argv) in a forked child (no seconds of imports per run), SIGKILLed before its
    `kill_at`th mutation under `out` (killed_run.hook); (its exit status, its output)."""
    log = out.parent / f"output-{kill_at}-{len(list(out.parent.glob('output-*')))}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: one thread (as DataLoader workers: no OpenMP pool across a fork), output to `log`
        code = 1
        try:
            torch.set_num_threads(1)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            watch = killed_run.watch(out, kill_at)
            train.main(argv)
            code = 0
            (out.parent / "mutations").write_text(str(watch.count))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), log.read_text()


def digest(directory: Path) -> dict[str, str]:
    """A save as its bytes: the tensors whole, state.json without where the run was written."""
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())
             if f.suffix == ".safetensors"}
    state = json.loads((directory / "state.json").read_text())
    del state["config"]["train"]["output_dir"]
    return {**files, "state.json": json.dumps(state, sort_keys=True)}


def outcome(out: Path) -> dict:
    """What a user finds of a run: its log, saves, last and best, metrics, picture and leftovers."""
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
           for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k not in TIMING}
    with Image.open(out / "curves.png") as png:
        png.load()
        picture = png.size
    return {"log": log, "saves": sorted(p.name for p in (out / "checkpoints").iterdir()),
            "last": digest(out / "last"), "best": digest(out / "best"), "metrics": metrics, "picture": picture,
            "files": sorted(p.name for p in out.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tiny_paligemma, shapes_data, tmp_path_factory) -> tuple[int, dict]:
    """The run, whole: its count of mutations and its outcome."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, output = launch(command(tiny_paligemma, shapes_data, out), out)
    assert code == 0, output[-3000:]
    return int((out.parent / "mutations").read_text()), outcome(out)


def kill_points(total: int, final_save: int, every: int) -> list[int]:
    return sorted(set(range(1, final_save, every)) | set(range(final_save, total + 1)))


def test_a_run_killed_at_its_writes_ends_as_the_uninterrupted_one(tiny_paligemma, shapes_data, tmp_path,
                                                                   uninterrupted):
    total, expected = uninterrupted
    # The end of the run: the final save (its directory, 3 files, the rename, `last`), the prune
    # of the save before (a rename, 3 files, the directory), metrics.json and curves.png (a
    # file and a rename each): its last 16 mutations, and a few before them for good measure.
    points = kill_points(total, total - 20, int(os.environ.get("KILL_EVERY", "6")))
    tally = {"resumed": 0, "rerun": 0}
    for k in points:
        out = tmp_path / f"kill-{k}" / "run"
        argv = command(tiny_paligemma, shapes_data, out)
        code, output = launch(argv, out, kill_at=k)
        assert code == -signal.SIGKILL, (k, output[-2000:])
        resumed = latest_checkpoint(out) is not None
        tally["resumed" if resumed else "rerun"] += 1
        code, output = launch(argv + (["--resume"] if resumed else []), out)
        assert code == 0, (k, output[-3000:])
        assert outcome(out) == expected, (k, output[-3000:])
    print(f"killed at {len(points)} of {total} mutations: {tally}")
