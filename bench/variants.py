"""Accuracy after training, per LoRA variant, on the demo and digits jobs, over seeds.

    .venv/bin/python bench/variants.py --variant dora=lora.use_dora=true --variant pissa=lora.init=\\"pissa\\"
    .venv/bin/python bench/variants.py --variant lora= --configs configs/demo.toml --seeds 0

A variant is LABEL=OVERRIDES, `section.key=value` config overrides joined by commas (train.py's
--set). Each run is `train.py` in a fresh process, one after another (never two at once: the
machine's cores are the measurement). Prints a Markdown table of accuracy_after per config and
seed, and writes every run's metrics to bench/results/<date>-variants.json. Needs `make base data`
and `make digits` once (the base and the two datasets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=[KEY=VALUE,...]")
    ap.add_argument("--configs", nargs="+", default=["configs/demo.toml", "configs/digits.toml"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    results = []
    for text in args.variant:
        label, _, spec = text.partition("=")
        overrides = [o for o in spec.split(",") if o]
        for config in args.configs:
            for seed in args.seeds:
                out = ROOT / "runs" / "variants" / f"{label}-{Path(config).stem}-s{seed}"
                sets = [f"train.seed={seed}", f"train.output_dir=\"{out}\"", *overrides]
                cmd = [sys.executable, "train.py", "--config", config, *[a for s in sets for a in ("--set", s)]]
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                metrics = json.loads((out / "metrics.json").read_text())
                results.append({"variant": label, "overrides": overrides, "config": config, "seed": seed, **metrics})
                print(f"{label:10} {Path(config).stem:8} seed {seed}: {metrics['accuracy_after']:.3f} "
                      f"({metrics['train_seconds']:.0f} s)", flush=True)
    path = ROOT / "bench" / "results" / f"{datetime.date.today()}-variants.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\n| variant | {' | '.join(Path(c).stem for c in args.configs)} |\n|---|{'---|' * len(args.configs)}")
    for label in dict.fromkeys(r["variant"] for r in results):
        cells = [" ".join(f"{r['accuracy_after']:.3f}" for r in results if r["variant"] == label and r["config"] == c)
                 for c in args.configs]
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
