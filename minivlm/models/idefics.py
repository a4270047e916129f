"""IDEFICS (v1, HuggingFaceM4/idefics-9b): Flamingo-style. A Llama decoder reads the text; every
`cross_layer_interval` layers a gated cross-attention block looks at CLIP image features. An
image takes a single <image> token in the text, so sequences stay short.

The processor takes interleaved lists, [image, text], and wraps each image in
<fake_token_around_image>. A sample is [image, "prompt answer</s>"], the loss on "answer</s>".
"""

from __future__ import annotations

from functools import partial

import torch
from PIL import Image
from transformers import IdeficsForVisionText2Text

from minivlm.models import Layout, chat, from_config, processor

NAME = "IDEFICS"
MODEL_CLASS = IdeficsForVisionText2Text
CHAT = False  # no chat template: one question per sample, no system turn (batches.check_samples)
MAX_IMAGES = 1  # its processor interleaves more; the captioning recipe has one per sample, and no markers are placed here
PACKING = False  # its images enter by cross-attention, an image mask per row: rows cannot be joined
PREFILL_ONCE = False  # GRPO's groups copy the prompt (evaluate.prefilled_once): its gated cross-attention reads the images at every step
# lm_head and embed_tokens are decoupled layers (extra rows for added tokens) and never quantized.
QUANT_SKIP = ["vision_model", "perceiver_resampler", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]  # in self-attention and in the gated cross-attention
LORA_SKIP = ["vision_model", "perceiver_resampler"]
# lora.vision adapts every linear in here: CLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_model"

load_processor = processor.load
RESOLUTION = ()  # CLIP at its checkpoint's one size


@chat.leaves_no_state
def training_batch(processor, images: list[list[Image.Image]], dialogs: list[chat.Dialog],
                   system: str = "") -> dict[str, torch.Tensor]:
    prompts, answers = chat.single_exchange(dialogs)
    tok = processor.tokenizer
    full = [f"{p} {a}{tok.eos_token}" for p, a in zip(prompts, answers)]
    batch = dict(processor(text=[[*ims, t.removesuffix(tok.eos_token)] for ims, t in zip(images, full)],
                           add_eos_token=True, padding=True, padding_side="right", return_tensors="pt"))
    # No header before the answer: it is found as itself and the EOS, which the prompt never holds.
    batch["labels"] = chat.answer_labels(batch, tok, [[(p, t)] for p, t in zip(prompts, full)], "", tok.eos_token)
    return batch


@chat.leaves_no_state
def generation_batch(processor, images: list[list[Image.Image]], prompts: list[str],
                     system: str = "") -> dict[str, torch.Tensor]:
    return dict(processor(text=[[*ims, chat.plain(p)] for ims, p in zip(images, prompts)], padding=True,
                          padding_side="left",
                          return_tensors="pt"))


skeleton = partial(from_config, MODEL_CLASS)


def layout(model: IdeficsForVisionText2Text, preprocessor: dict) -> Layout:
    """No image tokens in the text: a gated cross-attention block every cross_layer_interval layers
    reads the perceiver's latents, and each block costs every text token what a layer does."""
    c = model.config
    v = c.vision_config
    tc = c.get_text_config()
    return Layout(tc, v.embed_dim, v.intermediate_size, 0, 1, (v.image_size // v.patch_size) ** 2 + 1,
                  f"images enter by cross-attention ({c.perceiver_config.resampler_n_latents} perceiver latents), "
                  "not as tokens", cross_attention_layers=tc.num_hidden_layers // tc.cross_layer_interval)
