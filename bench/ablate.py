"""What one optimisation buys: minivlm against minivlm, on bench/compare.py's model and job.

    .venv/bin/python bench/ablate.py --variant before=@bce9143 --variant after=@a8edf08
    .venv/bin/python bench/ablate.py --variant own= --variant shared=lora.shared_dropout=true
    .venv/bin/python bench/ablate.py --variant off=@641a76b,train.gradient_checkpointing=true \\
                                     --variant on=@be94c59,train.gradient_checkpointing=true

A variant is LABEL=SPEC, SPEC a comma-separated list of `@REV` (run minivlm as it was at that
git revision, checked out in a temporary worktree) and `section.key=value` config overrides.
Every run is a fresh process; variants alternate (A B A B ...), `--runs` runs each, medians.
Size and job flags are compare.py's (`--quick`, `--hidden`, `--steps`, ...). Prints samples/s,
tokens/s, peak memory and the final loss of each variant, and each one's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """This script's --variant flags, and the rest: compare.py's size and job flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=[@REV][,KEY=VALUE...]")
    return ap.parse_known_args()


# Run as a script, the arguments are read before compare.py is imported (it imports torch: seconds),
# so that --help answers at once; main() reads them again.
if __name__ == "__main__":
    parse_args()

import compare  # noqa: E402  bench/compare.py: the model, the job, the hooks that time it


def run_at(src: str | None, spec: dict) -> dict:
    """compare.run_minivlm with minivlm imported from `src` (a checkout) instead of this one."""
    if src:
        sys.path.insert(0, src)
    result = compare.run_minivlm(spec)
    import minivlm
    result["minivlm_from"] = str(Path(minivlm.__file__).parent)
    return result


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    label, _, spec = text.partition("=")
    rev, overrides = None, []
    for part in filter(None, spec.split(",")):
        if part.startswith("@"):
            rev = part[1:]
        else:
            overrides.append(part)
    return label, rev, overrides


def main() -> None:
    ours, rest = parse_args()
    args = compare.parse_args(rest)
    variants = [parse_variant(v) for v in ours.variant]

    data = compare.ROOT / args.data
    path = compare.model_dir(args)
    if not (path / "bench_counts.json").exists():
        compare.in_fresh_process(compare.build_model, {k: getattr(args, k) for k in compare.SIZE_FLAGS}, str(path))
    n = sum(1 for _ in (data / "train" / "metadata.jsonl").open())
    spec = {"model": str(path), "data": str(data), "order": compare.data_order(n, args),
            **{k: getattr(args, k) for k in ("seed", "steps", "batch_size", "grad_accum", "lr", "warmup",
                                             "weight_decay", "max_grad_norm", "r", "alpha", "dropout", "dtype",
                                             "workers")}}
    with tempfile.TemporaryDirectory(prefix="ablate-") as tmp:
        sources = {}
        for label, rev, _ in variants:
            if rev:
                sources[label] = f"{tmp}/{label}"
                subprocess.run(["git", "-C", str(compare.ROOT), "worktree", "add", "--detach", "-q",
                                sources[label], rev], check=True)
        try:
            runs = {label: [] for label, _, _ in variants}
            for i in range(args.runs):
                for label, _, overrides in variants:
                    with tempfile.TemporaryDirectory(prefix="ablate-run-") as work:
                        t0 = time.perf_counter()
                        r = compare.in_fresh_process(run_at, sources.get(label),
                                                     {**spec, "set": [*args.set, *overrides], "work": work})
                    runs[label].append(r)
                    print(f"run {i + 1}/{args.runs} {label:10s} {time.perf_counter() - t0:6.1f}s  "
                          f"from {r['minivlm_from']}  loss {' '.join(f'{x:.4f}' for x in r['loss'])}", flush=True)
        finally:
            for src in sources.values():
                subprocess.run(["git", "-C", str(compare.ROOT), "worktree", "remove", "--force", src], check=False)

    per_step = args.batch_size * args.grad_accum
    rows = {}
    for label, side_runs in runs.items():
        rates = [compare.steady(r, per_step) for r in side_runs]
        peak = "peak_cuda_mib" if side_runs[0]["peak_cuda_mib"] is not None else "peak_rss_mib"
        rows[label] = {"samples_per_s": statistics.median(r["samples_per_s"] for r in rates),
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rates),
                       "peak_mib": statistics.median(r[peak] for r in side_runs),
                       "final_loss": statistics.median(r["loss"][-1] for r in side_runs)}
    first = rows[variants[0][0]]
    print(f"\nmedians of {args.runs} runs each, {args.steps} steps, batch {args.batch_size} x {args.grad_accum}, "
          f"{args.dtype}, {compare.machine()['name']}")
    print("| variant | samples/s | tokens/s | peak MiB | final loss | samples/s ratio | peak ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['samples_per_s']:.3f} | {row['tokens_per_s']:.1f} | {row['peak_mib']:.0f} | "
              f"{row['final_loss']:.4f} | {row['samples_per_s'] / first['samples_per_s']:.2f} | "
              f"{row['peak_mib'] / first['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
