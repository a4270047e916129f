"""Padding, tokens/s and peak memory of one epoch over a document-like mix of image sizes and answer
lengths: plain batches against data.group_by_length and data.packing.

    .venv/bin/python bench/packing.py            (about 5 minutes on 2 cores)
    .venv/bin/python bench/packing.py --quick    (a few samples, one run each: a smoke test)

Needs the tiny Qwen2.5-VL base (`make base FAMILY=qwen2_5_vl`). The data, written once to
bench/.cache/docs-mix: pages of dark text lines on white, in aspect ratios from 1:4 to 4:1 and
from 32 to 200 pixels a side, at max_pixels 40,000 and 16 pixels a token 4 to 156 image tokens;
answers of 1 to 30 words. Each setting trains one epoch of the same samples (QLoRA, NF4, batch
8, SFT) in a fresh process; the settings alternate, medians over --runs:
  - padding: the share of the positions the model computed that were padding (log.jsonl's
    `padding`, over the epoch's steps);
  - tokens/s: real tokens (image and text) a second of training, log.jsonl's;
  - seconds: the whole epoch, group_by_length's measuring of every sample's length included;
  - peak memory: the process's peak RSS during training less its RSS before (on CUDA,
    torch.cuda.max_memory_allocated less memory_allocated before).
Results: bench/results/<date>-<machine>-packing.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "base" / "tiny-qwen2_5_vl"
MODES = {"plain": {}, "group_by_length": {"group_by_length": True}, "packing": {"packing": True},
         "both": {"group_by_length": True, "packing": True}}
WORDS = "the a page line total table figure date name amount of and in on is to from invoice report".split()


def docs_mix(n: int) -> Path:
    """bench/.cache/docs-mix-<n>, written the first time (write_docs)."""
    out = ROOT / "bench" / ".cache" / f"docs-mix-{n}"
    return out if (out / "train" / "metadata.jsonl").is_file() else write_docs(out, n)


def write_docs(out: Path, n: int, seed: int = 0) -> Path:
    """An imagefolder of `n` page images of varied size and shape, each with an answer of 1 to 30 words."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ratio = rng.choice([0.25, 0.5, 0.75, 1.0, 1.33, 2.0, 4.0])  # width / height
        area = rng.uniform(32 * 32, 200 * 200)
        w = max(16, min(400, round((area * ratio) ** 0.5)))
        h = max(16, min(400, round((area / ratio) ** 0.5)))
        page = Image.new("RGB", (w, h), (250, 250, 245))
        draw = ImageDraw.Draw(page)
        for y in range(4, h - 4, 8):  # text lines of random lengths
            draw.rectangle((4, y, 4 + rng.randint(w // 4, w - 8), y + 3), fill=(30, 30, 30))
        page.save(train / f"{i}.png")
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        rows.append(json.dumps({"file_name": f"{i}.png", "question": "what does the page say", "answer": answer}))
    (train / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out


def widened(hidden: int, out: Path) -> Path:
    """The base's architecture, tokenizer and processor with a decoder `hidden` wide (4·hidden MLP,
    heads of the base's 32 dimensions, which its M-RoPE sections add up to), random weights: where the linears' cost per token outweighs attention's, as
    in real checkpoints (the base's 128 wide makes attention over a long packed row the larger part)."""
    import shutil

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(BASE)
    text = config.text_config
    text.hidden_size, text.intermediate_size = hidden, 4 * hidden
    text.num_attention_heads, text.num_key_value_heads = hidden // 32, max(1, hidden // 256)
    config.vision_config.out_hidden_size = hidden
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    for f in BASE.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


def measure(model: str, data: str, mode: str, batch_size: int, max_pixels: int = 40000) -> dict:
    """One epoch of `data` in one of MODES, on the GPU if there is one; the figures of the docstring."""
    import torch

    from bench.compare import PeakMemory
    from minivlm.build import build
    from minivlm.config import from_dict
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import sft

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict({
            "model": {"family": "qwen2_5_vl", "name_or_path": model, "dtype": "float32",
                      "processor": {"max_pixels": max_pixels}},
            "quant": {"load_in_4bit": True}, "lora": {"r": 8, "alpha": 16},
            "data": {"dataset": data, "max_length": 400, **MODES[mode]},
            "train": {"output_dir": out, "epochs": 1, "batch_size": batch_size, "lr": 1e-3, "optimizer": "adamw",
                      "device": "cuda" if cuda else "cpu", "save_every": 0}})
        built = build(cfg)
        ds = load_split(cfg.data, "train")
        start = time.perf_counter()
        with PeakMemory() as peak:
            train(cfg, built, sft, ds)
        seconds = time.perf_counter() - start
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {"mode": mode, "steps": len(log), "padding": statistics.mean(r["padding"] for r in log),
            "tokens_per_s": log[-1]["tokens_per_s"], "seconds": seconds, "peak_bytes": peak.bytes,
            "losses": [r["loss"] for r in log]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--hidden", type=int, default=0, help="a random decoder this wide instead of the base's 128")
    ap.add_argument("--quick", action="store_true", help="16 samples, one run each")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.runs = 16, 1
    if not (BASE / "config.json").is_file():
        sys.exit(f"{BASE} is missing: run `make base FAMILY=qwen2_5_vl` first")
    from bench.compare import in_fresh_process, machine

    data = docs_mix(args.samples)
    model = widened(args.hidden, ROOT / "bench" / ".cache" / f"qwen2_5_vl-{args.hidden}") if args.hidden else BASE
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for _ in range(args.runs):
        for mode in args.modes:  # alternating settings, each in a fresh process
            runs[mode].append(in_fresh_process(measure, str(model), str(data), mode, args.batch_size))
            print(json.dumps({k: v for k, v in runs[mode][-1].items() if k != "losses"}), flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])
    table = ["| batches | padding | tokens/s | × plain | epoch s | × plain | peak MiB | × plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in args.modes:
        table.append(f"| {mode} | {med(mode, 'padding'):.1%} | {med(mode, 'tokens_per_s'):.0f} "
                     f"| {med(mode, 'tokens_per_s') / med('plain', 'tokens_per_s'):.2f} | {med(mode, 'seconds'):.1f} "
                     f"| {med(mode, 'seconds') / med('plain', 'seconds'):.2f} | {med(mode, 'peak_bytes') / 2**20:.0f} "
                     f"| {med(mode, 'peak_bytes') / med('plain', 'peak_bytes'):.2f} |")
    info = machine()
    text = (f"# one epoch of a document-like mix: plain batches, data.group_by_length, data.packing\n\n"
            f"{info['gpu'] or info['cpu']} ({info['cores']} cores), tiny Qwen2.5-VL ({model.name}"
            f"{', random' if args.hidden else ''}, decoder {args.hidden or 128} wide), QLoRA NF4, "
            f"{args.samples} samples, batch {args.batch_size}, medians of {args.runs} fresh processes\n\n"
            + "\n".join(table) + "\n")
    print(text)
    if not args.quick:
        out = ROOT / "bench" / "results" / f"{datetime.date.today()}-{info['name']}-packing{args.hidden or ''}"
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "samples": args.samples, "hidden": args.hidden,
                                                        "batch_size": args.batch_size, "runs": runs}, indent=1))
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
