"""SIGTERM and Ctrl-C during training: the step finishes, is saved, and --resume ends bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minivlm.cli import train
from conftest import ROOT, count_steps
from minivlm.loop import StopSignal
from minivlm.objectives import sft

STEPS = 30  # a signal sent after step 1 lands by step 3 or so: mid-run, with room to spare


def args(tiny_paligemma, shapes_data, output_dir) -> list[str]:
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", 'data.eval_split=""',
            f"train.output_dir={output_dir}", f"train.max_steps={STEPS}", "train.batch_size=4",
            "train.optimizer=adamw", "train.eval_every=0", "train.device=cpu"]  # demo.toml: lora dropout 0.05
    return ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]


def final_state(output_dir) -> tuple[bytes, bytes, dict]:
    """The last save's adapter and training state, as bytes and JSON.

    Less Python's `random` state, which nothing in training draws from and every process seeds
    anew: two uninterrupted runs differ there too.
    """
    last = output_dir / "last"
    meta = json.loads((last / "state.json").read_text())
    del meta["state"]["rng"]["python"]
    return ((last / "adapter.safetensors").read_bytes(), (last / "state.safetensors").read_bytes(),
            {k: meta[k] for k in ("step", "state", "loop")})


@pytest.fixture(scope="module")
def uninterrupted(tiny_paligemma, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train.main(args(tiny_paligemma, shapes_data, out))["steps"] == STEPS
    return final_state(out)


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGINT, 1)],
                         ids=["SIGTERM", "SIGINT", "Ctrl-C with a DataLoader worker"])
def test_a_signal_saves_the_step_and_resume_ends_bit_identical(signum, workers, uninterrupted, tiny_paligemma,
                                                               shapes_data, tmp_path, monkeypatch):
    """Ctrl-C in a terminal signals the whole process group: the DataLoader's workers get the
    SIGINT too (they ignore it; the training process saves and stops them)."""
    out = tmp_path / "run"
    log = out / "log.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = args(tiny_paligemma, shapes_data, out) + ["--set", f"data.workers={workers}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    while not (log.is_file() and log.read_text().count("\n") >= 1):  # mid-run: at least one step done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    landed = log.read_text().count("\n")
    sent = time.perf_counter()
    os.killpg(proc.pid, signum)  # to the group, as a terminal does
    stdout, stderr = proc.communicate(timeout=120)
    seconds = time.perf_counter() - sent

    assert proc.returncode == 128 + signum, stderr
    saved = json.loads((out / "last/state.json").read_text())["step"]
    assert landed <= saved < STEPS  # the step in progress finished and was saved; the run did not go on
    assert len(log.read_text().splitlines()) == saved
    assert "Traceback" not in stderr
    assert stdout.strip().splitlines()[-1].endswith("--resume")  # the one line saying how to go on
    print(f"\n{signal.Signals(signum).name}: sent after step {landed}, saved step {saved}, "
          f"exit code {proc.returncode}, {seconds:.2f} s from signal to exit")

    trained = count_steps(monkeypatch, sft)
    assert train.main(args(tiny_paligemma, shapes_data, out) + ["--resume"])["steps"] == STEPS
    assert len(trained) == STEPS - saved  # it went on from the saved step
    assert final_state(out) == uninterrupted  # adapter, optimizer, scaler, RNG: the same bits


def test_handlers_are_installed_only_while_training_and_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # remembered, nothing interrupted
        os.kill(os.getpid(), signal.SIGINT)  # at once: torchrun's echo of a Ctrl-C, ignored
        assert stop.signum == signal.SIGTERM
        time.sleep(StopSignal.ECHO_SECONDS)
        with pytest.raises(KeyboardInterrupt):  # later: the user insists
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
