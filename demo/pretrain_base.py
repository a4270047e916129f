"""Build the demo's base VLM: a tiny PaliGemma (SigLIP + Gemma) or Qwen2.5-VL (a dynamic-resolution
ViT + Qwen2.5 with M-RoPE), pretrained here to caption shapes in English and Spanish and to repeat
any word of its vocabulary, with a byte-level BPE tokenizer.

    python demo/pretrain_base.py --out base/tiny-paligemma                          (or: make base)
    python demo/pretrain_base.py --family qwen2_5_vl --out base/tiny-qwen2_5_vl      (make base FAMILY=qwen2_5_vl)

Deterministic (fixed seeds, synthetic data); a few minutes on this project's 2 CPU cores. The result
is saved with `save_pretrained` like any hub checkpoint, processor included, so the demo loads it
through exactly the code path a real checkpoint of its architecture goes through. The Qwen2.5-VL
base sees its images at varying sizes (32 to 64 pixels a side, so 4 to 16 image tokens), as
dynamic resolution feeds a real one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# The bases this script builds (BASES, below, makes each one's processor and model), and their
# pretraining steps (batch 32). The Qwen2.5-VL base learns more slowly: its loss was still falling
# at 1500 steps (0.10 against PaliGemma's 0.03).
STEPS = {"paligemma": 1500, "qwen2_5_vl": 2000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(STEPS), default="paligemma")
    ap.add_argument("--out", type=Path, default=None, help="default: base/tiny-<family>")
    ap.add_argument("--steps", type=int, default=None, help="default: the family's (STEPS)")
    return ap.parse_args(argv)


# Run as a script, the arguments are read before the imports below (torch and transformers:
# seconds), so that --help and a mistyped option answer at once; the end of the file reads them again.
if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,  # noqa: E402
                          PaliGemmaProcessor, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, SiglipVisionConfig)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import CAPTION_PROMPTS, COLORS, POSITIONS, QUESTIONS, SHAPES, SIZE, caption, sample  # noqa: E402
from minivlm.models import get_family  # noqa: E402
from minivlm.models.processor import ImagesOnly  # noqa: E402

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


def byte_level_bpe(specials: list[str], corpus: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer with `specials` first in its vocabulary.

    Byte-level: the 256 bytes are tokens, so any text, in any script, has a spelling and nothing
    becomes <unk>; merges learned on `corpus` make each of its words one token (the corpus runs
    out of pairs to merge before the 1024 asked for). A space is prefixed to every text, so a
    word is the same token at the start of an answer as inside it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def make_processor() -> PaliGemmaProcessor:
    """The byte-level BPE tokenizer in the real PaliGemmaProcessor."""
    tok = byte_level_bpe(["<pad>", "<eos>", "<bos>", "<image>"], tokenizer_corpus())
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


# The chat template of Qwen/Qwen2.5-VL-7B-Instruct (and Qwen2-VL): a default system turn, and each
# image as <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to its tokens.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_PATCH = 8  # PaliGemma's 8-pixel patches, 16 in a 32×32 image; merged 2×2, they are 4 image tokens


def make_qwen_processor() -> Qwen2_5_VLProcessor:
    """The byte-level BPE tokenizer (plus the chat template's words) in the real Qwen2_5_VLProcessor,
    images between 16×16 and 64×64 pixels' worth of tokens."""
    tok = byte_level_bpe(QWEN_SPECIALS, tokenizer_corpus() + ["system user assistant You are a helpful assistant."])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    images = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2,
                                      min_pixels=16 * 16, max_pixels=64 * 64)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=ImagesOnly(),
                               chat_template=QWEN_VL_TEMPLATE)


def make_qwen_model(processor: Qwen2_5_VLProcessor, hidden: int = 128, layers: int = 4
                    ) -> Qwen2_5_VLForConditionalGeneration:
    """PaliGemma's sizes in Qwen2.5-VL's architecture.

    M-RoPE splits each head's 16 rotary frequencies into time, row and column sections (the real
    7B: 16/24/24 of 64), highest first: the column gets the slowest ones. At the real rope_theta
    (1e6, for 128k-token contexts) or the usual 1e4, a step of one column turns them by 0.003 rad
    or less, and the base cannot tell a left image token from a right one (captions 0.19 / 0.26
    after pretraining, "where is the shape" at chance; docs/log.md). rope_theta 10 suits these
    60-token sequences: a column step turns the slowest frequency by 0.12 rad.
    """
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 6, 6]})
    # window_size in pixels, as the real 112 (8 merged tokens of 14-pixel patches): here 2 merged
    # tokens, so a 64-pixel image has several windows and the last block attends over all of them.
    vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4, patch_size=QWEN_PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, window_size=4 * QWEN_PATCH,
                  fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2_5_VLForConditionalGeneration(config)


def varied_size(image: Image.Image, rng: random.Random) -> Image.Image:
    """Half the time the image as drawn, else resized to a random 32, 48 or 64 pixels a side."""
    if rng.random() < 0.5:
        return image
    return image.resize((rng.choice([32, 48, 64]), rng.choice([32, 48, 64])), Image.BILINEAR)


# How each base of STEPS is made: its processor, and its model from that processor.
BASES = {"paligemma": (make_processor, make_model), "qwen2_5_vl": (make_qwen_processor, make_qwen_model)}


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


def pretrain(out: Path, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             family: str = "paligemma") -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    make_processor_of, make_model_of = BASES[family]
    fam = get_family(family)
    processor = make_processor_of()
    model = make_model_of(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        images, prompts, answers = zip(*[pretraining_sample(rng) for _ in range(batch_size)])
        if family != "paligemma":  # dynamic resolution: images at their own sizes
            images = [varied_size(im, rng) for im in images]
        batch = fam.training_batch(processor, [[im] for im in images], [[(p, a)] for p, a in zip(prompts, answers)])
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
        accuracy = caption_accuracy(model, fam, processor, prompt, random.Random(seed + 1))
        print(f"{prompt!r} accuracy on 200 new images: {accuracy:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.2f}M-parameter tiny {fam.NAME} to {out} in {time.perf_counter() - t0:.0f}s")


@torch.no_grad()
def caption_accuracy(model, family, processor, prompt: str, rng: random.Random, n: int = 200) -> float:
    model.eval()
    images, attrs = zip(*[sample(rng) for _ in range(n)])
    batch = family.generation_batch(processor, [[im] for im in images], [prompt] * n)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == caption(a, CAPTION_PROMPTS[prompt]) for t, a in zip(texts, attrs)) / n


if __name__ == "__main__":
    args = parse_args()
    pretrain(args.out or Path(f"base/tiny-{args.family}"), args.steps or STEPS[args.family], family=args.family)
