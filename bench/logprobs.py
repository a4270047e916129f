"""Peak memory and time of the answer tokens' log-probabilities: full logits against train.logits_chunk.

    .venv/bin/python bench/logprobs.py            (about 3 minutes on 2 cores)
    .venv/bin/python bench/logprobs.py --quick    (a small vocabulary, one run each: a smoke test)

The job is what GRPO scores (and DPO, and SFT with long answers): G rows of L answer tokens through
a PaliGemma with the real 257,152-word vocabulary (bench/compare.py's model, a small decoder: the
vocabulary-sized tensors are what is measured), one forward and backward of
logprobs.answer_log_probs in bf16 autocast, as training runs it. Each setting runs in a fresh
process (spawn), the settings alternate, medians over --runs:
  - peak memory: the process's peak RSS during the forward and backward, less its RSS before
    them (on CUDA, torch.cuda.max_memory_allocated less memory_allocated before);
  - seconds of a second forward and backward (the first one sets the peak and warms up).
Results: bench/results/<date>-<machine>-logprobs.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = dict(hidden=256, intermediate=1024, layers=2, heads=4, kv_heads=1, head_dim=64, vocab=257152,
             vision_hidden=64, vision_intermediate=128, vision_layers=1, vision_heads=2, image_size=112, patch=14,
             seed=0, dtype="bfloat16")
QUICK = dict(vocab=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="G: rows (completions) in the batch")
    ap.add_argument("--length", type=int, default=256, help="L: answer tokens a row (about)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256, 64],
                    help="train.logits_chunk values to measure (0 = full logits)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a small vocabulary, short rows, one run each")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.length, args.chunks, args.runs = 2, 16, [0, 8], 1
    return args


def measure(model_dir: str, rows: int, length: int, chunk: int) -> dict:
    import torch
    from PIL import Image

    from minivlm.batches import answer_positions
    from minivlm.build import build
    from minivlm.config import from_dict
    from bench.compare import PeakMemory
    from minivlm.logprobs import answer_log_probs

    cuda = torch.cuda.is_available()
    cfg = from_dict({"model": {"family": "paligemma", "name_or_path": model_dir, "dtype": "bfloat16"},
                     "data": {"dataset": "unused", "max_length": 4 * length + 512},
                     "train": {"device": "cuda" if cuda else "cpu", "bf16": True, "logits_chunk": chunk}})
    built = build(cfg)
    built.model.train()
    # Answers of `length` words ("0 1 2 ..."): about `length` tokens each in the demo's byte-level BPE.
    answers = [" ".join(str((i * 7 + r) % 100) for i in range(length)) for r in range(rows)]
    batch = built.family.training_batch(built.processor, [[Image.new("RGB", (64, 64), (200, 40, 40))]] * rows,
                                        [[("repeat", a)] for a in answers])
    targets = batch["labels"][:, 1:]
    targets = targets[targets != -100]

    def step() -> None:
        answer_log_probs(cfg, built, batch, answer_positions(batch), targets).sum().backward()

    with PeakMemory() as peak:
        step()
    built.model.zero_grad()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return {"chunk": chunk, "answer_tokens": len(targets), "peak_bytes": peak.bytes,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.compare import build_model, in_fresh_process, machine

    sizes = {**SIZES, **(QUICK if args.quick else {})}
    model_dir = ROOT / "bench" / ".cache" / f"paligemma-logprobs-v{sizes['vocab']}"
    if not (model_dir / "config.json").is_file():
        build_model(sizes, str(model_dir))
    runs: dict[int, list[dict]] = {c: [] for c in args.chunks}
    for _ in range(args.runs):
        for chunk in args.chunks:  # alternating settings, each in a fresh process
            runs[chunk].append(in_fresh_process(measure, str(model_dir), args.rows, args.length, chunk))
            print(json.dumps(runs[chunk][-1]), flush=True)
    full = statistics.median(r["peak_bytes"] for r in runs[args.chunks[0]])
    full_s = statistics.median(r["seconds"] for r in runs[args.chunks[0]])
    table = [f"| logits_chunk | answer tokens | peak memory (MiB) | × {args.chunks[0] or 'full'} | s fwd+bwd | × |",
             "|---|---|---|---|---|---|"]
    for chunk, rs in runs.items():
        peak, seconds = statistics.median(r["peak_bytes"] for r in rs), statistics.median(r["seconds"] for r in rs)
        table.append(f"| {chunk or 'full (0)'} | {rs[0]['answer_tokens']} | {peak / 2**20:.0f} | {peak / full:.2f} "
                     f"| {seconds:.2f} | {seconds / full_s:.2f} |")
    info = machine()
    report = {"machine": info, "sizes": sizes, "rows": args.rows, "length": args.length, "runs": runs}
    text = (f"# answer log-probabilities: full logits against chunks\n\n{info['gpu'] or info['cpu']}, "
            f"vocab {sizes['vocab']}, {args.rows} rows, bf16 autocast, medians of {args.runs} fresh processes\n\n"
            + "\n".join(table) + "\n")
    print(text)
    if not args.quick:
        out = ROOT / "bench" / "results" / f"{datetime.date.today()}-{info['name']}-logprobs"
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
