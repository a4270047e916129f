"""`make bench-gpu`: what one CUDA GPU can show in a few minutes (meant: under 8; not yet run on one).

    .venv/bin/python bench/gpu.py            (on a CUDA GPU; `make bench-gpu` builds the demo base and data first)
    .venv/bin/python bench/gpu.py --quick    (tiny sizes on the CPU: the smoke test make test runs)

1. bench/compare.py at PaliGemma-3B's shape (random weights; bench/README.md), bf16 weights and
   autocast, paged 8-bit AdamW: minivlm against PEFT + Trainer, alternating fresh processes,
   medians: samples/s, torch.cuda.max_memory_allocated, both loss curves.
2. --dry-run's planned peak against the measured one (max_memory_allocated, a few steps of
   training in a fresh process), for the demo config and for the 3B shape. The plan is for
   full-length batches (data.max_length) and includes the CUDA context, which
   max_memory_allocated does not see: both are shown, and the plan without the context.
3. A packing pair: one epoch of bench/packing.py's document-like mix through the tiny Qwen2.5-VL
   base, plain batches against data.packing (and data.group_by_length): padding, tokens/s and
   peak memory, one fresh process each.

Everything it runs also runs on the CPU (--quick), so the first GPU meets tested code: only the
device, the sizes and the numbers differ. Writes bench/results/<date>-<gpu>-bench-gpu.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# PaliGemma-3B (google/paligemma-3b-pt-224): Gemma-2B's decoder, SigLIP so400m at 224 px.
SHAPE_3B = ["--hidden", "2048", "--intermediate", "16384", "--layers", "18", "--heads", "8", "--kv-heads", "1",
            "--head-dim", "256", "--vision-hidden", "1152", "--vision-intermediate", "4304", "--vision-layers", "27",
            "--vision-heads", "16", "--batch-size", "4", "--dtype", "bfloat16"]
# compare.py's names for what it measured as the peak.
KINDS = {"peak_cuda_mib": "max_memory_allocated", "peak_rss_mib": "peak RSS"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="compare.py's runs per side (each loads 3B weights: ~1 min)")
    ap.add_argument("--steps", type=int, default=10, help="compare.py's optimizer steps per run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run, on whatever device there is")
    ap.add_argument("--data", default="data/shapes-qa", help="the imagefolder `make data` writes")
    ap.add_argument("--demo-model", default="base/tiny-paligemma", help="the demo's base (`make base`)")
    ap.add_argument("--qwen-model", default="base/tiny-qwen2_5_vl",
                    help="the packing pair's model (`make base FAMILY=qwen2_5_vl`)")
    ap.add_argument("--out", default="bench/results")
    return ap.parse_args(argv)


def planned_against_measured(config: str, overrides: list[str], steps: int) -> dict:
    """--dry-run's plan for the config, and the peak a few training steps reach (step_time.measure,
    in a fresh process)."""
    from bench.compare import in_fresh_process, planned
    from bench.step_time import measure
    from minivlm.config import load_config

    run = in_fresh_process(measure, config, overrides, steps)
    return {**planned(load_config(config, overrides)), "measured_mib": run["peak_mib"], "measured_kind": "max_memory_allocated" if run["device"].startswith("cuda")
            else "peak RSS", "device": run["device"], "s_per_step": run["s_per_step"]}


def packing_pair(model: str, quick: bool) -> dict:
    """bench/packing.py's epoch, plain, grouped and packed, one fresh process each (--quick: 16
    samples at a tenth of the pixels, for the tiny test model's smaller patches)."""
    from bench.compare import in_fresh_process
    from bench.packing import MODES, docs_mix, measure

    samples = 16 if quick else 256
    data = docs_mix(samples)
    runs = {mode: in_fresh_process(measure, str(ROOT / model), str(data), mode, 8, 4000 if quick else 40000)
            for mode in MODES if mode != "both"}
    return {"samples": samples, **{mode: {k: v for k, v in r.items() if k != "losses"} for mode, r in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench import compare

    if not torch.cuda.is_available() and not args.quick:
        sys.exit("bench/gpu.py: no CUDA GPU here; `--quick` runs the same steps at tiny sizes on the CPU")
    for path, make in ((ROOT / args.data / "train/metadata.jsonl", "make data"),
                       (ROOT / args.demo_model / "config.json", "make base"),
                       (ROOT / args.qwen_model / "config.json", "make base FAMILY=qwen2_5_vl")):
        if not path.is_file():
            sys.exit(f"bench/gpu.py: {path} is missing; run `{make}` first (`make bench-gpu` does)")

    with tempfile.TemporaryDirectory() as work:
        shape = ["--quick"] if args.quick else [*SHAPE_3B, "--runs", str(args.runs), "--steps", str(args.steps)]
        status = compare.main([*shape, "--data", args.data, "--out", work])
        report = json.loads(next(Path(work).glob("*.json")).read_text())
    summary = report["summary"]
    demo = ["configs/demo.toml", [f"model.name_or_path={args.demo_model}", f"data.dataset={args.data}"]]
    plans = {"demo": planned_against_measured(*demo, steps=3 if args.quick else 10),
             "compare": {**summary["minivlm"]["plan"], "measured_mib": summary["minivlm"]["peak_mib"],
                         "measured_kind": KINDS[summary["minivlm"]["peak_kind"]]}}

    packed = packing_pair(args.qwen_model, args.quick)

    labels = {"demo": "configs/demo.toml", "compare": "compare.py's tiny sizes" if args.quick else "PaliGemma-3B shape"}
    mach = compare.machine()
    m, p, ratio = summary["minivlm"], summary["peft"], summary["ratio"]
    lines = [f"# make bench-gpu, {datetime.date.today()}, {mach['gpu'] or mach['cpu']}{' (--quick)' if args.quick else ''}",
             "", f"torch {mach['torch']}, transformers {mach['transformers']}, bitsandbytes {mach['bitsandbytes']}, "
             f"peft {mach['peft']}.", "",
             f"## minivlm against PEFT + Trainer ({'tiny sizes' if args.quick else 'PaliGemma-3B shape'}, "
             f"{report['args']['dtype']}, paged 8-bit AdamW, medians of {report['args']['runs']} runs a side)", "",
             "| | minivlm | PEFT + Trainer | minivlm / PEFT |", "|---|---:|---:|---:|",
             f"| samples/s | {m['samples_per_s']:.3f} | {p['samples_per_s']:.3f} | **{ratio['samples_per_s']:.2f}x** |",
             f"| peak memory (MiB, {KINDS[m['peak_kind']]}) | {m['peak_mib']:.0f} | {p['peak_mib']:.0f} | "
             f"**{ratio['peak_mib']:.2f}** |",
             f"| largest loss difference | | | {max(summary['loss_rel_diff']):.2%} |", "",
             "## --dry-run's plan against the measured peak", "",
             "| config | planned | planned without CUDA context | measured | measured / planned without context |",
             "|---|---:|---:|---:|---:|",
             *(f"| {labels[name]} | {r['planned_mib']:.0f} MiB | {r['planned_without_context_mib']:.0f} MiB | "
               f"{r['measured_mib']:.0f} MiB ({r['measured_kind']}) | "
               f"{r['measured_mib'] / r['planned_without_context_mib']:.2f} |" for name, r in plans.items()), "",
             f"## Packing: one epoch of {packed['samples']} document-like samples, tiny Qwen2.5-VL, batch 8", "",
             "| batches | padding | tokens/s | × plain | peak MiB | × plain |", "|---|---:|---:|---:|---:|---:|",
             *(f"| {mode} | {r['padding']:.1%} | {r['tokens_per_s']:.0f} | "
               f"{r['tokens_per_s'] / packed['plain']['tokens_per_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
               f"{r['peak_bytes'] / packed['plain']['peak_bytes']:.2f} |" for mode, r in packed.items()
               if mode != "samples"), ""]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today()}-{mach['name']}-bench-gpu{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": mach, "compare": report, "plans": plans,
                                                          "packing": packed}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(f"written: {stem}.json, {stem}.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
