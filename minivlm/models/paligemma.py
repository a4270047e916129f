"""PaliGemma: SigLIP vision tower -> linear projector -> Gemma decoder, trained as a prefix LM.

The processor lays a sample out as

    <image> × image_seq_length  <bos>  prompt  \\n  answer  <eos>  <pad>…
    └──────────── prefix: token_type_ids = 0 ─────┘└ suffix: 1 ┘

and the model attends bidirectionally inside the prefix, causally over the suffix. The loss
is taken on the suffix only: answer tokens and the EOS that teaches the model to stop.
"""

from __future__ import annotations

from functools import partial

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from minivlm.models import Layout, chat, from_config, processor

NAME = "PaliGemma"
MODEL_CLASS = PaliGemmaForConditionalGeneration
CHAT = False  # no chat template: one question per sample, no system turn (batches.check_samples)
MAX_IMAGES = 1  # pretrained and transferred with one image per prefix
PACKING = True  # data.packing (packing.py): each prefix attends within its own sample
QUANT_SKIP = ["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_tower", "multi_modal_projector"]
# lora.vision adapts every linear in here: SigLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_tower"
RESOLUTION = ()  # fixed by the checkpoint: the 224, 448 and 896 variants are separate models
load_processor = processor.load


skeleton = partial(from_config, MODEL_CLASS)


def layout(model: PaliGemmaForConditionalGeneration, preprocessor: dict) -> Layout:
    """One image, each SigLIP patch one token of the text: (image_size / patch_size)²."""
    c = model.config
    v = c.vision_config
    n = getattr(c.text_config, "num_image_tokens", None) or (v.image_size // v.patch_size) ** 2
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, 1, n,
                  f"{n} image tokens ((image_size/patch)²)")


def _text(processor: PaliGemmaProcessor, prompt: str) -> str:
    # Placing <image> ourselves; without it the processor guesses the layout and warns.
    return processor.image_token + prompt


@chat.leaves_no_state
def training_batch(processor: PaliGemmaProcessor, images: list[list[Image.Image]], dialogs: list[chat.Dialog],
                   system: str = "") -> dict[str, torch.Tensor]:
    prompts, answers = chat.single_exchange(dialogs)
    batch = processor(images=images, text=[_text(processor, p) for p in prompts], suffix=answers,
                      padding="longest", padding_side="right", return_tensors="pt")
    # Label only the suffix (token_type_ids == 1): never image tokens, the prompt or padding.
    # The processor's own `labels` does the same but is kept upstream only for old code.
    batch["labels"] = batch["input_ids"].masked_fill(batch["token_type_ids"] == 0, -100)
    return dict(batch)


@chat.leaves_no_state
def generation_batch(processor: PaliGemmaProcessor, images: list[list[Image.Image]],
                     prompts: list[str], system: str = "") -> dict[str, torch.Tensor]:
    # Left padding: generation appends at the right end, so every row must end with its prompt.
    batch = processor(images=images, text=[_text(processor, chat.plain(p)) for p in prompts], padding="longest",
                      padding_side="left", return_tensors="pt")
    batch.pop("labels", None)
    return dict(batch)
