"""Generation's speed: GRPO's groups from one prefill, GRPO's sampling share, evaluate with a merged copy.

    .venv/bin/python bench/generation.py            (about 5 minutes on 2 cores; needs make base grpo-data)
    .venv/bin/python bench/generation.py --quick    (a few rows and steps: a smoke test)

The GRPO demo's job (configs/grpo_demo.toml: the tiny 4-bit PaliGemma with its adapters, 8 prompts
of 19 tokens, 16 of them an image's, 16 completions of up to 8 tokens each):
  1. sampling one step's completions (grpo.sample): each prompt prefilled once and its KV cache
     copied to its 16 rows (evaluate.prefilled_once) against generate(num_return_sequences=16),
     which prefills every prompt 16 times (the family's PREFILL_ONCE switched off), in one process,
     alternating, medians of --runs;
  2. GRPO training steps, each way, a fresh process each, alternating: the share of a step spent
     sampling (log.jsonl's sample_s / (sample_s + update_s), median over the steps);
  3. evaluate's greedy answers a second over the eval rows: the 4-bit model with its adapters against
     a copy with the adapters merged into dequantized float weights (lora.merge_lora), and what that
     copy costs in memory (its weights' bytes), alternating, medians.
Results: bench/results/<date>-<machine>-generation.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/grpo_demo.toml"


def config(overrides: list[str]):
    from minivlm.config import load_config
    return load_config(str(ROOT / CONFIG), [f"model.name_or_path={ROOT / 'base/tiny-paligemma'}",
                                            f"data.dataset={ROOT / 'data/shapes-en'}", *overrides])


def sampling(runs: int) -> dict:
    """Seconds of grpo.sample for one step's prompts, prefilled once against copied, alternating."""
    import torch

    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.objectives import grpo

    cfg = config([])
    built = build(cfg)
    ds = load_split(cfg.data, "train")
    inputs = grpo.collate(ds, list(range(cfg.train.batch_size)), cfg.data, built.family, built.processor)["inputs"]
    g = cfg.grpo
    seconds: dict[str, list[float]] = {"prefilled once": [], "copied (generate)": []}
    for run in range(runs + 1):  # the first round warms up
        for way, once in (("prefilled once", True), ("copied (generate)", False)):
            built.family.PREFILL_ONCE = once
            torch.manual_seed(run)
            start = time.perf_counter()
            grpo.sample(cfg, built, inputs, g.num_generations, g.temperature, g.top_p, g.max_new_tokens)
            if run:
                seconds[way].append(time.perf_counter() - start)
    built.family.PREFILL_ONCE = True
    return {"prompts": len(inputs["input_ids"]), "prompt_tokens": inputs["input_ids"].shape[1],
            "group": g.num_generations, "seconds": seconds}


def training_steps(once: bool, steps: int) -> dict:
    """`steps` GRPO steps of the demo, prefilled once or not; the log's per-step seconds."""
    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import grpo

    with tempfile.TemporaryDirectory() as out:
        cfg = config([f"train.output_dir={out}", f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0"])
        built = build(cfg)
        built.family.PREFILL_ONCE = once
        train(cfg, built, grpo, load_split(cfg.data, "train"))
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {"sample_s": [r["sample_s"] for r in log], "update_s": [r["update_s"] for r in log],
            "share": statistics.median(r["sample_share"] for r in log)}


def evaluation(runs: int, rows: int) -> dict:
    """evaluate's answers a second, the 4-bit model with adapters against a merged float copy."""
    import copy

    import bitsandbytes as bnb
    import torch

    from minivlm.build import Built, build
    from minivlm.data import load_split
    from minivlm.evaluate import evaluate
    from minivlm.lora import merge_lora
    from minivlm.modules import replace_module
    from minivlm.quant import dequantize

    cfg = config([f"data.eval_samples={rows}"])
    built = build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that change the answers, as trained ones do
        for name, p in built.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    merged_model = merge_lora(copy.deepcopy(built.model))
    for name, module in list(merged_model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            replace_module(merged_model, name, dequantize(module))
    merged = Built(**{**vars(built), "model": merged_model})

    def weight_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    ds = load_split(cfg.data, cfg.data.eval_split)
    per_s: dict[str, list[float]] = {"4-bit + adapters": [], "merged float copy": []}
    scores = {}
    for run in range(runs + 1):
        for way, b in (("4-bit + adapters", built), ("merged float copy", merged)):
            start = time.perf_counter()
            scores[way] = evaluate(cfg, b, ds)["score"]
            if run:
                per_s[way].append(rows / (time.perf_counter() - start))
    return {"rows": rows, "answers_per_s": per_s, "accuracy": scores,
            "weights_mib": {"4-bit + adapters": weight_bytes(built.model) / 2**20,
                            "merged float copy": weight_bytes(merged_model) / 2**20}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="GRPO training steps per process (part 2)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.steps = 1, 2
    for path, make in (("base/tiny-paligemma/config.json", "make base"), ("data/shapes-en", "make grpo-data")):
        if not (ROOT / path).exists():
            sys.exit(f"{path} is missing: run `{make}` first")
    from bench.compare import in_fresh_process, machine

    sample = in_fresh_process(sampling, args.runs)
    steps: dict[str, list[dict]] = {"prefilled once": [], "copied (generate)": []}
    for _ in range(1 if args.quick else 3):
        for way, once in (("prefilled once", True), ("copied (generate)", False)):
            steps[way].append(in_fresh_process(training_steps, once, args.steps))
    evals = in_fresh_process(evaluation, args.runs, 16 if args.quick else 64)

    med = statistics.median
    s_once, s_copied = med(sample["seconds"]["prefilled once"]), med(sample["seconds"]["copied (generate)"])
    share = {way: med(r["share"] for r in rs) for way, rs in steps.items()}
    step_s = {way: med(med(a + b for a, b in zip(r["sample_s"], r["update_s"])) for r in rs) for way, rs in steps.items()}
    e = {way: med(v) for way, v in evals["answers_per_s"].items()}
    info = machine()
    text = "\n".join([
        "# generation: GRPO's groups, GRPO's sampling share, evaluate with a merged copy", "",
        f"{info['gpu'] or info['cpu']} ({info['cores']} cores), {CONFIG}: the tiny 4-bit PaliGemma, "
        f"{sample['prompts']} prompts of {sample['prompt_tokens']} tokens × {sample['group']} completions", "",
        "| | prefilled once | copied (generate) | once / copied |", "|---|---:|---:|---:|",
        f"| grpo.sample, s a step (median of {args.runs}) | {s_once:.3f} | {s_copied:.3f} | **{s_once / s_copied:.2f}** |",
        f"| GRPO step, s (median of {args.steps} steps, {len(steps['prefilled once'])} processes) | "
        f"{step_s['prefilled once']:.3f} | {step_s['copied (generate)']:.3f} | "
        f"{step_s['prefilled once'] / step_s['copied (generate)']:.2f} |",
        f"| sampling's share of the step | {share['prefilled once']:.1%} | {share['copied (generate)']:.1%} | |", "",
        f"| evaluate ({evals['rows']} rows, greedy) | 4-bit + adapters | merged float copy | merged / 4-bit |",
        "|---|---:|---:|---:|",
        f"| answers/s (median of {args.runs}) | {e['4-bit + adapters']:.1f} | {e['merged float copy']:.1f} | "
        f"**{e['merged float copy'] / e['4-bit + adapters']:.2f}** |",
        f"| weights | {evals['weights_mib']['4-bit + adapters']:.1f} MiB | {evals['weights_mib']['merged float copy']:.1f} MiB "
        f"| {evals['weights_mib']['merged float copy'] / evals['weights_mib']['4-bit + adapters']:.2f} |",
        f"| accuracy | {evals['accuracy']['4-bit + adapters']:.3f} | {evals['accuracy']['merged float copy']:.3f} | |", ""])
    print(text)
    if not args.quick:
        out = ROOT / "bench" / "results" / f"{datetime.date.today()}-{info['name']}-generation"
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "sampling": sample, "steps": steps,
                                                        "evaluate": evals}, indent=1))
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
