"""Idefics2: SigLIP vision tower -> perceiver-resampler connector -> Mistral decoder.

Each image becomes `image_seq_len` (64) resampled tokens; with `do_image_splitting` the
processor also cuts it into 4 crops + the whole image, each with its own tokens. All of that
is the real Idefics2Processor's job; here we only say which turn to learn from.
"""

from functools import partial

from transformers import Idefics2ForConditionalGeneration

from minivlm.models import Layout, chat, from_config, processor

NAME = "Idefics2"
MODEL_CLASS = Idefics2ForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
PACKING = True  # data.packing (packing.py): samples end to end in one row
QUANT_SKIP = ["vision_model", "connector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_model", "connector"]
# lora.vision adapts every linear in here: SigLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_model"
END_OF_TURN = "<end_of_utterance>"
# The image processor's size bound and whether it cuts each image into 4 crops + the whole.
RESOLUTION = ("size", "do_image_splitting")

load_processor = processor.load
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: Idefics2ForConditionalGeneration, preprocessor: dict) -> Layout:
    """The perceiver's latents per image; with image splitting, 4 crops and the whole image each get theirs."""
    c = model.config
    v = c.vision_config
    split = preprocessor.get("do_image_splitting", True)
    images = 5 if split else 1
    n = c.perceiver_config.resampler_n_latents * images
    how = (f"{n} image tokens ({c.perceiver_config.resampler_n_latents} latents × {images} image"
           f"{'s: 4 crops + the whole, image splitting' if split else ''}"
           f"{'' if preprocessor else '; no preprocessor_config.json, so splitting assumed'})")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, images,
                  (v.image_size // v.patch_size) ** 2, how)
