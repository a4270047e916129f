"""Data parallel under torchrun (gloo, CPU): 2 ranks × batch b train as 1 process with batch 2b.

The runs are the tiny model with LoRA dropout 0: each rank draws its own dropout masks, which
the one-process run cannot reproduce. Nor can it reproduce GRPO's samples, drawn on each rank from
its own RNG: the GRPO case samples with top_p so small that only the likeliest token is kept, the
same completions however the prompts fall to ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker
from minivlm.cli import train
from conftest import ROOT, tiny_config
from minivlm.config import to_dict

STEPS = 3
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """|got − want| / |want|, the tensors taken together as one vector."""
    flat = [torch.cat([d[k].flatten() for k in sorted(want)]) for d in (got, want)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


# load_in_4bit, fsdp, data.streaming, train.objective
CASES = {"nf4": (True, False, False, "sft"), "float": (False, False, False, "sft"),
         "nf4-fsdp": (True, True, False, "sft"), "nf4-streamed": (True, False, True, "sft"),
         "nf4-grpo": (True, False, False, "grpo"), "nf4-dora": (True, False, False, "sft"),
         "nf4-dora-fsdp": (True, True, False, "sft"), "nf4-pissa": (True, False, False, "sft")}
# LoRA variants' keys, by case: DoRA replicated and sharded (its m, and W dequantized from a flat
# FSDP shard for the norm); PiSSA's start made from W by each rank.
LORA = {"nf4-dora": {"use_dora": True}, "nf4-dora-fsdp": {"use_dora": True}, "nf4-pissa": {"init": "pissa"}}


def test_two_ranks_train_as_one_process_on_the_combined_batch(tiny_paligemma, shapes_data, tmp_path):
    """Batch 1 × accumulation 2 on each of 2 ranks = batch 2 × accumulation 2 in one process, with
    a 4-bit and a float base replicated (DDP), a 4-bit base sharded (FSDP), and reading a stream
    (data.streaming, which every rank reads whole, collating its share), and GRPO (each rank sampling
    for its prompts, the KL term's tokens counted over both): the step's gradient (summed once per
    step: no_sync on the first micro-batch) and the adapters after 3 AdamW steps.
    The FSDP run also evaluates before training and every 2 steps, which every rank must run in
    step with the others."""
    configs = {}
    for case, (load_in_4bit, fsdp, streaming, objective) in CASES.items():
        for ranks, batch_size in ((2, 1), (1, 2)):
            if ranks == 1 and fsdp:
                continue  # alone, FSDP is a no-op: the replicated one-process run is the reference
            out = tmp_path / f"{case}-{ranks}"
            out.mkdir()
            cfg = to_dict(tiny_config(tiny_paligemma, shapes_data, out / "run", batch_size=batch_size, grad_accum=2,
                                      max_steps=STEPS, eval_every=2 if fsdp else 0, fsdp=fsdp, objective=objective))
            cfg["quant"]["load_in_4bit"] = load_in_4bit
            cfg["lora"].update(LORA.get(case, {}))
            # GRPO: every sample the likeliest token (the same on any rank), so all advantages are 0
            # and the gradient is the KL term's, B being non-zero at step 1 (ddp_worker.py).
            cfg["grpo"].update(num_generations=2, max_new_tokens=3, top_p=1e-9, beta=0.5)
            cfg["data"].update(streaming=streaming, eval_samples=8)
            (out / "config.json").write_text(json.dumps(cfg))
            configs.setdefault(ranks, []).append(out / "config.json")
    done = subprocess.run([*TORCHRUN, str(ROOT / "tests/ddp_worker.py"), *map(str, configs[2])],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for config in configs[1]:
        ddp_worker.run(config)  # the reference, in this process

    for case, (_, fsdp, _, objective) in CASES.items():
        two, one = tmp_path / f"{case}-2", tmp_path / f"{case.removesuffix('-fsdp')}-1"
        held = [json.loads((two / f"held-rank{r}.json").read_text()) for r in (0, 1)]
        whole = json.loads((one / "held-rank0.json").read_text())
        if fsdp:  # each rank holds its half of the layers, and all of what lies outside them
            assert held[0] < whole and held[1] < whole and sum(held) > whole, (case, held, whole)
        else:
            assert held == [whole, whole], case

        grads = [load_file(two / f"grads-rank{r}.safetensors") for r in (0, 1)]
        reference = load_file(one / "grads-rank0.safetensors")
        assert any("lora_A" in k for k in reference) and all(float(g.norm()) > 0 for g in reference.values())
        assert grads[0].keys() == reference.keys(), case
        for k in reference:
            assert torch.equal(grads[0][k], grads[1][k]), (case, k)  # both ranks hold the sum
            # fp32 rounding only: the same sums in another order, and matmuls over batches of
            # another size. Measured: ≤ 3.4e-7 of the whole gradient, ≤ 1.1e-6 of the smallest tensor.
            assert float((grads[0][k] - reference[k]).norm()) <= 4e-6 * float(reference[k].norm()), (case, k)
        assert relative_difference(grads[0], reference) <= 1e-6, case

        adapters = [load_file(two / f"adapters-rank{r}.safetensors") for r in (0, 1)]
        reference = load_file(one / "adapters-rank0.safetensors")
        for k in reference:
            assert torch.equal(adapters[0][k], adapters[1][k]), (case, k)  # identical across ranks
            # Adam's first steps are about ±lr per element whatever the gradient's size, so a
            # rounding difference in a near-zero gradient could move an element by up to 2·lr:
            # none did (measured ≤ 1.1e-6, against lr = 1e-3). B starts at 0, so per tensor B
            # differs by up to 2.2e-5 of its small norm; all adapters together, ≤ 2.8e-7 measured.
            assert float((adapters[0][k] - reference[k]).abs().max()) <= 1e-5, (case, k)
        assert relative_difference(adapters[0], reference) <= 1e-6, case
        # The same losses at every step, in rank 0's log.
        logs = [[r for r in map(json.loads, (out / "run/log.jsonl").read_text().splitlines()) if "loss" in r]
                for out in (two, one)]
        assert len(logs[0]) == STEPS
        count = "completions" if objective == "grpo" else "answer_tokens"
        for r2, r1 in zip(*logs):
            assert r2[count] == r1[count]
            torch.testing.assert_close(r2["loss"], r1["loss"], rtol=1e-6, atol=0)
        if fsdp:  # evaluated before training and at step 2, by both ranks in step
            assert [r["step"] for r in map(json.loads, (two / "run/log.jsonl").read_text().splitlines())
                    if "val_loss" in r] == [0, 2]


def args(tiny_paligemma: Path, shapes_data: Path, output_dir: Path, *sets: str) -> list[str]:
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", 'data.eval_split=""',
            f"train.output_dir={output_dir}", "train.batch_size=2", "train.optimizer=adamw", "train.eval_every=0",
            "train.device=cpu", "lora.dropout=0.0", *sets]
    return ["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])]


def test_resume_with_another_number_of_ranks_is_refused(tiny_paligemma, shapes_data, tmp_path):
    out = tmp_path / "run"
    train.main(args(tiny_paligemma, shapes_data, out, f"train.max_steps={STEPS}"))
    state = out / "last/state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "world_size": 2}))  # as a 2-rank run would have saved it
    with pytest.raises(SystemExit, match="was trained by 2 process"):
        train.main([*args(tiny_paligemma, shapes_data, out, "train.max_steps=6"), "--resume"])


def test_killed_two_rank_run_resumes_bit_exact(tiny_paligemma, shapes_data, tmp_path):
    """SIGTERM to torchrun mid-run: the step in progress is saved, and --resume ends where the
    uninterrupted run does, to the bit. Rank 0 alone wrote."""
    steps = 8
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = [*TORCHRUN, str(ROOT / "train.py")]
    done = subprocess.run([*command, *args(tiny_paligemma, shapes_data, whole, f"train.max_steps={steps}")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run = subprocess.Popen([*command, *args(tiny_paligemma, shapes_data, killed, f"train.max_steps={steps}")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = killed / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # as `kill PID` of the launcher, or a scheduler, would
    stdout, stderr = run.communicate(timeout=120)
    stopped_at = json.loads((killed / "last/state.json").read_text())["step"]
    assert 1 <= stopped_at < steps, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stdout  # rank 0 says so, once
    assert stdout.count("SIGTERM: stopped after step") == 1

    done = subprocess.run([*command, *args(tiny_paligemma, shapes_data, killed, f"train.max_steps={steps}"),
                           "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (killed / "last/adapter.safetensors").read_bytes() == (whole / "last/adapter.safetensors").read_bytes()
    # Rank 1 wrote nothing: one log line per step (not two), and only rank 0's saves.
    assert len(log.read_text().splitlines()) == steps
    assert json.loads((killed / "last/state.json").read_text())["world_size"] == 2


def test_a_mistake_is_said_once_under_torchrun(monkeypatch):
    """Every rank meets the same config mistake: rank 0 prints it, the others exit 1 in silence."""
    argv = ["--config", str(ROOT / "configs/demo.toml"), "--set", "train.lr=-1"]
    with pytest.raises(SystemExit, match="error: train.lr = -1.0 must be > 0"):
        train.main(argv)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it
    with pytest.raises(SystemExit) as quiet:
        train.main(argv)
    assert quiet.value.code == 1
