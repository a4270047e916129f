"""Data parallel under torchrun (gloo, CPU): 2 ranks × batch b train as 1 process with batch 2b.

The run is the demo's config (4-bit NF4 base, LoRA) on the tiny model, with LoRA dropout 0:
each rank draws its own dropout masks, which the one-process run cannot reproduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import train
from conftest import ROOT

STEPS, BATCH = 3, 2  # per rank: the 2-rank run's global batch is 4


def args(tiny_paligemma: Path, shapes_data: Path, output_dir: Path, batch_size: int) -> list[str]:
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", 'data.eval_split=""',
            f"train.output_dir={output_dir}", f"train.max_steps={STEPS}", f"train.batch_size={batch_size}",
            "train.optimizer=adamw", "train.eval_every=0", "train.device=cpu", "lora.dropout=0.0"]
    return ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]


def torchrun(*argv: str) -> None:
    """train.py in 2 processes (gloo on the CPU), as a user would launch it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_train_as_one_process_on_the_combined_batch(tiny_paligemma, shapes_data, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(*args(tiny_paligemma, shapes_data, two, BATCH))
    assert train.main(args(tiny_paligemma, shapes_data, one, 2 * BATCH))["steps"] == STEPS

    # The same loss and gradient norm at every step: the ranks' sums are those of the combined
    # batch, up to fp32 rounding in another order of addition.
    logs = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (two, one)]
    for r2, r1 in zip(*logs):
        assert r2["answer_tokens"] == r1["answer_tokens"]
        torch.testing.assert_close(r2["loss"], r1["loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r2["grad_norm"], r1["grad_norm"], rtol=1e-6, atol=0)
    # The adapters after 3 AdamW steps. Elementwise relative differences mean little here: Adam
    # divides by sqrt(v), so an element whose gradient is near 0 moves by ±lr on a rounding
    # difference. Per tensor, the difference is ~1e-5 of the tensor (about 6e-6 measured).
    ranks2, ranks1 = load_file(two / "last/adapter.safetensors"), load_file(one / "last/adapter.safetensors")
    assert ranks2.keys() == ranks1.keys()
    for k in ranks1:
        assert float((ranks2[k] - ranks1[k]).norm()) <= 2e-5 * float(ranks1[k].norm()), k
        assert float((ranks2[k] - ranks1[k]).abs().max()) <= 1e-6, k
    # Rank 1 wrote nothing: one log line per step (not two), one save (no step-…-2 beside it).
    assert len((two / "log.jsonl").read_text().splitlines()) == STEPS
    assert [p.name for p in (two / "checkpoints").iterdir()] == [f"step-{STEPS:08d}"]
    assert json.loads((two / "last/state.json").read_text())["world_size"] == 2


def test_resume_with_another_number_of_ranks_is_refused(tiny_paligemma, shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(tiny_paligemma, shapes_data, out, BATCH))
    state = out / "last/state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "world_size": 2}))  # as a 2-rank run would have saved it
    try:
        train.main([*args(tiny_paligemma, shapes_data, out, BATCH), "--set", "train.max_steps=6", "--resume"])
    except SystemExit as e:
        assert "was trained by 2 process(es) and this run has 1" in str(e)
    else:
        raise AssertionError("a resume with another number of ranks went on")


def test_two_ranks_resume_bit_exact(tiny_paligemma, shapes_data, tmp_path):
    """A 2-rank run resumed from its step-2 save ends where the uninterrupted one did, to the bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(*args(tiny_paligemma, shapes_data, whole, BATCH), "--set", "train.max_steps=4",
             "--set", "train.save_every=2")
    torchrun(*args(tiny_paligemma, shapes_data, resumed, BATCH), "--set", "train.max_steps=4",
             "--resume", str(whole / f"checkpoints/step-{2:08d}"))
    assert (resumed / "last/adapter.safetensors").read_bytes() == (whole / "last/adapter.safetensors").read_bytes()
