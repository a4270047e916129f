"""Soak: a long run of the demo config, killed once at a random step and resumed, watched for leaks.

    .venv/bin/python bench/soak.py [--steps 10000] [--out runs/soak]   # needs `make base data` first

train.py runs `configs/demo.toml` for --steps optimizer steps, saving every 100 (2 kept, and the
best) and evaluating every 500. Every 2 s this script reads the training process's resident
memory (/proc/<pid>/status VmRSS) and the step it is at (log.jsonl). At a random step between
50% and 70% of the run it SIGKILLs it, copies the log as it was, and runs `--resume`. At the end:

- the peak RSS in every 1,000 steps of training, of each process, and its growth from the first
  full 1,000 (after warm-up) to the last: a growth over 5% is a leak to find; the end of the run
  (the evaluation after training, metrics.json, curves.png) apart;
- the log holds every step once, 1..steps, in order; `last` is the final step; the saves on disk
  are the 2 newest and the best, nothing left over (*.tmp, *.del);
- the resume was exact: the steps trained twice (after the last save before the kill, up to the
  kill) have the same loss and gradient norm, to the bit, before and after.

Writes its figures to <out>.soak.json and prints them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 ** 2


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def current_step(log: Path) -> int:
    try:
        lines = log.read_bytes().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def watch(argv: list[str], log: Path, samples: list, kill_at: int | None = None) -> int:
    """Run train.py, sampling (step, RSS) every 2 s; SIGKILL it once the log reaches `kill_at`."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        step = current_step(log)
        samples.append((step, rss(proc.pid)))
        if kill_at is not None and step >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return step
        time.sleep(2)
    if proc.returncode:
        sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return current_step(log)


def per_1000(samples: list[tuple[int, int]], last: int) -> dict[int, int]:
    """The peak RSS (MiB) seen while training was in each thousand steps (the end of the run, once
    the log reaches the `last` step, is end_of_run's)."""
    peaks: dict[int, int] = {}
    for step, memory in samples:
        if step and memory and step < last:
            peaks[step // 1000 * 1000] = max(peaks.get(step // 1000 * 1000, 0), memory)
    return {k: round(v / MiB) for k, v in sorted(peaks.items())}


def growth(samples: list[tuple[int, int]], last: int) -> float | None:
    """RSS growth of one process from its first full thousand steps (after warm-up) to its last."""
    peaks = per_1000(samples, last)
    marks = sorted(peaks)[1:]  # the first thousand is warm-up (and, resumed, a partial one)
    return (peaks[marks[-1]] - peaks[marks[0]]) / peaks[marks[0]] if len(marks) >= 2 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"train.output_dir={args.out}", f"train.max_steps={args.steps}", "train.save_every=100",
            "train.eval_every=500", "train.keep_checkpoints=2", "train.epochs=1000"]
    argv = ["--config", "configs/demo.toml", *sum((["--set", s] for s in sets), [])]
    kill_at = random.Random(args.seed).randint(args.steps // 2, args.steps * 7 // 10)
    first_run: list[tuple[int, int]] = []
    second_run: list[tuple[int, int]] = []
    t0 = time.time()
    killed = watch(argv, out / "log.jsonl", first_run, kill_at)
    before_kill = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumed_from = json.loads((out / "last/state.json").read_text())["step"]
    watch(argv + ["--resume"], out / "log.jsonl", second_run)
    seconds = time.time() - t0

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [r for r in log if "loss" in r or "skipped" in r]
    steps_in_order = [r["step"] for r in trained] == list(range(1, args.steps + 1))
    twice = {r["step"]: r for r in before_kill if "loss" in r and r["step"] > resumed_from}
    again = {r["step"]: r for r in log if r["step"] in twice and "loss" in r}
    exact = bool(twice) and all(twice[s]["loss"] == again[s]["loss"] and twice[s]["grad_norm"] == again[s]["grad_norm"]
                                for s in twice)
    saves = sorted(p.name for p in (out / "checkpoints").iterdir())
    leftovers = [s for s in saves if "." in s]
    result = {
        "steps": args.steps, "seconds": round(seconds), "killed_at_step": killed, "resumed_from_step": resumed_from,
        "steps_trained_twice": len(twice), "resume_exact": exact, "log_steps_in_order": steps_in_order,
        "last": (out / "last").resolve().name, "saves": saves, "leftovers": leftovers,
        "rss_mib_per_1000_steps": {"killed run": per_1000(first_run, args.steps),
                                   "resumed run": per_1000(second_run, args.steps)},
        "rss_growth_after_warmup": {"killed run": growth(first_run, args.steps),
                                    "resumed run": growth(second_run, args.steps)},
        # the evaluation after training, metrics.json and curves.png (matplotlib, 10,000 points)
        "end_of_run_rss_mib": round(max((m for s, m in second_run if s >= args.steps), default=0) / MiB),
        "samples": {"killed run": first_run, "resumed run": second_run},
    }
    (out.parent / f"{out.name}.soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
