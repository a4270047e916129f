"""Peak host memory while loading a 4-bit base: streamed (minivlm/load.py) against the float load it
replaced (from_pretrained in `dtype`, then quant.quantize_linears), each in a fresh process.

    .venv/bin/python bench/load_memory.py [--out /tmp/minivlm-load-memory]

The model is a random PaliGemma with the real vocabulary (257152 tokens; the embedding is most of
it and stays float, as quant.skip says) and a small Gemma decoder and SigLIP tower, written with
save_pretrained in float32 and in bfloat16. Loads: each checkpoint in its own dtype, and the float32
one in bfloat16 (real PaliGemma and Idefics2 checkpoints are float32, trained in bf16).

Peak RSS is getrusage(RUSAGE_SELF).ru_maxrss of the loading process; "runtime" is the same after
the imports, before loading; "touched" is the peak once every weight has been read once (as the
first forward does). The device is the CPU, so the loaded model is in host memory too. from_pretrained
keeps a float weight whose dtype matches the checkpoint's as a view of the memory-mapped file:
its pages become resident only when read, which is why its load peak can sit below the model size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOADS = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]  # (checkpoint, load)
MiB = 1024 ** 2


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_checkpoint(out: Path, dtype: str) -> None:
    import torch
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    config = PaliGemmaConfig(
        text_config=GemmaConfig(vocab_size=257152, hidden_size=768, intermediate_size=3072, num_hidden_layers=8,
                                num_attention_heads=12, num_key_value_heads=1, head_dim=64),
        vision_config=SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                                         num_attention_heads=6, image_size=224, patch_size=14, projection_dim=768),
        projection_dim=768, image_token_index=257151)
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).to(getattr(torch, dtype)).save_pretrained(out)


def child(way: str, path: str, dtype_name: str) -> None:
    """One load in this (fresh) process; prints its figures as JSON."""
    import bitsandbytes as bnb
    import torch

    sys.path.insert(0, str(ROOT))
    from minivlm.load import load_pretrained
    from minivlm.models import paligemma
    from minivlm.quant import quantize_linears

    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    runtime = peak_rss()
    if way == "streamed":
        model, _ = load_pretrained(paligemma.MODEL_CLASS, path, dtype, cpu, True, paligemma.QUANT_SKIP)
    else:
        model = paligemma.MODEL_CLASS.from_pretrained(path, dtype=dtype)
        quantize_linears(model, paligemma.QUANT_SKIP, dtype, cpu)
        model.to(cpu)
    peak = peak_rss()
    for t in [*model.parameters(), *model.buffers()]:
        t.data.view(-1)[:: 256].sum()  # one value per 256 is one per page or more: every page read
    touched = peak_rss()
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied: counted once
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    stats = [s.absmax for s in states] + [s.code for s in states] + [s.state2.absmax for s in states if s.nested]
    model_bytes = sum(t.numel() * t.element_size() for t in [*tensors.values(), *stats])
    quantized = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))  # 2 a byte
    print(json.dumps({"runtime": runtime, "peak": peak, "touched": touched, "model": model_bytes, "quantized_params": quantized}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/minivlm-load-memory", help="where the random checkpoints go")
    parser.add_argument("--child", nargs=3, metavar=("WAY", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.make:
        return make_checkpoint(Path(args.make[0]), args.make[1])
    rows = []
    for checkpoint_dtype, dtype in LOADS:
        path = Path(args.out) / checkpoint_dtype
        if not (path / "config.json").exists():
            # In a process of its own too: a child starts with its parent's peak RSS (Linux carries
            # ru_maxrss across fork and exec), so the parent must stay small.
            subprocess.run([sys.executable, __file__, "--make", str(path), checkpoint_dtype], check=True)
        for way in ("from_pretrained + quantize_linears", "streamed"):
            out = subprocess.run([sys.executable, __file__, "--child", way.split()[0], str(path), dtype],
                                 check=True, capture_output=True, text=True).stdout
            rows.append((checkpoint_dtype, dtype, way, json.loads(out.strip().splitlines()[-1])))
    print(f"random PaliGemma, vocab 257152, Gemma 768/3072 × 8 layers, SigLIP 224/14 × 4 layers; "
          f"{rows[0][3]['quantized_params'] / 1e6:.1f}M params in 4-bit linears; device cpu")
    print("| checkpoint → load | load | runtime | peak RSS | peak − runtime | touched − runtime | loaded model |")
    print("|---|---|---|---|---|---|---|")
    for checkpoint_dtype, dtype, way, r in rows:
        print(f"| {checkpoint_dtype} → {dtype} | {way} | {r['runtime'] / MiB:.0f} | {r['peak'] / MiB:.0f} | "
              f"{(r['peak'] - r['runtime']) / MiB:.0f} | {(r['touched'] - r['runtime']) / MiB:.0f} | "
              f"{r['model'] / MiB:.0f} |")
    print("(MiB)")

if __name__ == "__main__":
    main()
