"""Build the demo's base VLM: a tiny PaliGemma (SigLIP + Gemma) pretrained here to caption shapes
in English and Spanish and to repeat any word of its vocabulary, with a byte-level BPE tokenizer.

    python demo/pretrain_base.py --out base/tiny-paligemma      (or: make base)

Deterministic (fixed seeds, synthetic data); about 100 s on this project's 2 CPU cores. The result is
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
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                          PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import CAPTION_PROMPTS, COLORS, POSITIONS, QUESTIONS, SHAPES, SIZE, caption, sample  # noqa: E402
from minivlm.models import paligemma  # noqa: E402

PATCH = 8


# Words beyond the shapes' own, so that a user's data (digits, yes/no, common nouns) tokenizes
# into whole words instead of single bytes; anything else is still spelled byte by byte.
MORE_WORDS = """yes no how many what which who where when why is are was there here the a an of in on at to and or
not this that it its with for from by as be has have do does can could one two three four five six seven eight nine
ten zero number digit letter word text sign picture photo image color shape size big small large little left right
top bottom middle center up down above below near far front back person man woman child dog cat bird horse car bus
train tree flower sky water grass road house room table chair food plate cup book ball black brown orange pink gray"""


REPEAT_WORDS = sorted({*MORE_WORDS.split(), *map(str, range(100))})


def tokenizer_corpus() -> list[str]:
    """Every caption the base learns, the demo's questions, more words and the numbers 0-99."""
    attrs = [{"color": c, "shape": s, "position": p} for c in COLORS for s in SHAPES for p in POSITIONS]
    captions = [caption(a, lang) for a in attrs for lang in CAPTION_PROMPTS.values()]
    return [*captions, *CAPTION_PROMPTS, *QUESTIONS, "repeat", *REPEAT_WORDS]


def make_processor() -> PaliGemmaProcessor:
    """A byte-level BPE tokenizer in the real PaliGemmaProcessor.

    Byte-level: the 256 bytes are tokens, so any text, in any script, has a spelling and nothing
    becomes <unk>; merges learned on `tokenizer_corpus()` make each of its words one token (the
    corpus runs out of pairs to merge before the 1024 asked for). A space is prefixed to every
    text, so a word is the same token at the start of an answer as inside it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<eos>", "<bos>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", extra_special_tokens={"image_token": "<image>"})
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


def pretraining_sample(rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, prompt, answer): a caption in English or Spanish or, one time in four, "repeat <word>"
    -> "<word>" over the tokenizer's words and numbers.

    Repeating trains the output embedding of every word, so that a fine-tune can teach the base
    to answer with any of them (a digit, "yes"). A word the base never wrote keeps an embedding
    that pretraining only pushed away from every hidden state, all such words the same way: a
    fine-tune on digits then barely tells one from another (0.155 accuracy, chance 0.10;
    docs/log.md). Repeating several words at once was too hard for this model in the time.
    """
    image, attrs = sample(rng)
    if rng.random() < 0.25:
        word = rng.choice(REPEAT_WORDS)
        return image, f"repeat {word}", word
    prompt = rng.choice(list(CAPTION_PROMPTS))
    return image, prompt, caption(attrs, CAPTION_PROMPTS[prompt])


def pretrain(out: Path, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = make_processor()
    model = make_model(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        images, prompts, answers = zip(*[pretraining_sample(rng) for _ in range(batch_size)])
        batch = paligemma.training_batch(processor, list(images), [[(p, a)] for p, a in zip(prompts, answers)])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        # Loss on the answer tokens: logits[:, t] predicts token t+1.
        targets = labels[:, 1:]
        keep = targets != -100
        loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum") / keep.sum()
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
