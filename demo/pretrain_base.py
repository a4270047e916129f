"""Build the demo's base VLM: a tiny PaliGemma (SigLIP + Gemma) pretrained here to caption shapes.

    python demo/pretrain_base.py --out base/tiny-paligemma      (or: make base)

Deterministic (fixed seeds, synthetic data) and about three minutes on 2 CPU cores. The result is
saved with `save_pretrained` like any hub checkpoint, processor included, so the demo loads it
through exactly the code path a real PaliGemma goes through.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                          PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import CAPTION_PROMPTS, SIZE, VOCAB, caption, sample  # noqa: E402
from minivlm.loop import answer_loss_sum  # noqa: E402
from minivlm.models import paligemma  # noqa: E402

PATCH = 8


def make_processor() -> PaliGemmaProcessor:
    """A word-level tokenizer over the demo's words, in the real PaliGemmaProcessor."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    image_processor.image_seq_length = (SIZE // PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_model(processor: PaliGemmaProcessor, hidden: int = 128, layers: int = 4) -> PaliGemmaForConditionalGeneration:
    vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=4, image_size=SIZE, patch_size=PATCH,
                                vision_use_head=False)  # as in real PaliGemma: it reads all patch tokens
    text = GemmaConfig(vocab_size=len(processor.tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=128, pad_token_id=processor.tokenizer.pad_token_id,
                       eos_token_id=processor.tokenizer.eos_token_id, bos_token_id=processor.tokenizer.bos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             projection_dim=hidden)
    return PaliGemmaForConditionalGeneration(config)


def pretrain(out: Path, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = make_processor()
    model = make_model(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        prompts = [rng.choice(list(CAPTION_PROMPTS)) for _ in range(batch_size)]
        images, captions = zip(*[(im, caption(a, CAPTION_PROMPTS[p])) for p, (im, a) in
                                 zip(prompts, (sample(rng) for _ in range(batch_size)))])
        batch = paligemma.training_batch(processor, list(images), [[(p, c)] for p, c in zip(prompts, captions)])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = answer_loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()
        loss.backward()
        for group in opt.param_groups:  # short warmup, then cosine to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * torch.cos(torch.tensor(step / steps * 3.1416)).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    for prompt in CAPTION_PROMPTS:
        accuracy = caption_accuracy(model, processor, prompt, random.Random(seed + 1))
        print(f"{prompt!r} accuracy on 200 new images: {accuracy:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.2f}M-parameter tiny PaliGemma to {out} in {time.perf_counter() - t0:.0f}s")


@torch.no_grad()
def caption_accuracy(model, processor, prompt: str, rng: random.Random, n: int = 200) -> float:
    model.eval()
    images, attrs = zip(*[sample(rng) for _ in range(n)])
    batch = paligemma.generation_batch(processor, list(images), [prompt] * n)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == caption(a, CAPTION_PROMPTS[prompt]) for t, a in zip(texts, attrs)) / n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("base/tiny-paligemma"))
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    pretrain(args.out, args.steps)
