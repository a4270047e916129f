"""Time QLoRA training steps and report peak memory, 4-bit against a float base.

    .venv/bin/python bench/step_time.py [--config configs/demo.toml] [--steps 20] [--set key=value ...]

Prints seconds per optimizer step, samples/s, and peak memory: CUDA's max_memory_allocated on a
GPU, the process's peak RSS on the CPU. Run `make base data` first for the demo config.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(config: str, overrides: list[str], steps: int) -> dict:
    # Imported here, in the process that measures: torch and transformers take seconds, and
    # --help should not wait for them.
    import torch

    from minivlm.build import build
    from minivlm.config import load_config
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import get_objective

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"train.max_steps={steps}", f"train.output_dir={out}"])
        built = build(cfg)
        ds = load_split(cfg.data, cfg.data.train_split)
        if built.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train(cfg, built, get_objective(cfg.train.objective), ds)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if built.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        samples = steps * cfg.train.batch_size * cfg.train.grad_accum
        return {"device": str(built.device), "s_per_step": seconds / steps, "samples_per_s": samples / seconds,
                "peak_mib": peak / 2**20, "trainable": built.trainable_params, "total": built.total_params}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    for label, extra in [("nf4 base", ["quant.load_in_4bit=true"]), ("float base", ["quant.load_in_4bit=false"])]:
        # A fresh process each, so the peak RSS of one run does not carry into the next.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            r = pool.apply(measure, (args.config, [*args.set, *extra], args.steps))
        print(f"{label:10}  {r['device']:5}  {r['s_per_step']:.3f} s/step  {r['samples_per_s']:7.1f} samples/s  "
              f"peak {r['peak_mib']:8.1f} MiB  trainable {r['trainable']:,} of {r['total']:,}")
