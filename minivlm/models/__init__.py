"""Model families: everything that differs between VLMs lives in one module each.

A family module provides:
  NAME              how messages name it ("PaliGemma")
  CHAT              whether its prompt format is a chat template: a system turn, multi-turn dialogs
  MAX_IMAGES        images one sample may hold (None: any number, each where its <image> marker is)
  MODEL_CLASS       the transformers class loaded with from_pretrained
  QUANT_SKIP        modules kept unquantized by default
  LORA_TARGETS      modules wrapped by LoRA by default (suffix names)
  LORA_SKIP         modules never adapted by default
  VISION_BLOCKS     the vision tower's transformer blocks: lora.vision adapts every linear inside
  RESOLUTION        the processor's resolution controls that model.processor may set (processor.py)
  MODEL_RESOLUTION  (optional) those of them the model's config holds too, set on both
  PACKING           whether data.packing may join its samples into one row (packing.py): True where its
                    attention within a sample follows from positions alone (tests/test_packing.py)
  PREFILL_ONCE      (optional, default True) False where GRPO's G completions a prompt cannot go on
                    from one prefill's copied KV cache (evaluate.prefilled_once): generate then copies the prompt
  rope_positions(model, batch)  (optional) its own rotary positions of a padded batch, (k, rows, seq),
                    where they do not simply count up (Qwen-VL's M-RoPE); packing.py restarts them per sample
  load_processor(path, trust_remote_code, **resolution)      -> the family's real processor
  training_batch(processor, images, dialogs, system)          -> tensors incl. labels (-100 = no loss)
  generation_batch(processor, images, prompts, system)       -> left-padded tensors for model.generate
                   (images: a list per sample)
  skeleton(path, dtype)        the model from its config.json alone (the planner builds it on the meta device)
  layout(model, preprocessor)  -> Layout: what the memory planner reads of the model (below)
A family that reads video also provides (the others refuse data.video_column):
  VIDEO_RESOLUTION  the video processor's resolution controls that model.video_processor may set (may be ())
  video_tokens(model, video, frames) -> (text tokens, tower patches, how counted) of a video
                    (video: the video processor's settings, as plan.py gathers them)
  load_processor(..., video_resolution=...)  with a video processor that needs no torchvision
  VIDEO_BESIDE_IMAGES  (optional, default True) False: a batch holds images or videos, not both

A dialog is a list of (user, assistant) exchanges; most data has one. Chat-template families
share their batching in `chat.py`.

Families import nothing from the rest of minivlm: everything else is built on them.
"""

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType

# Each family's module, by family name. A module is imported only when its family is asked for
# (get_family): the modules import torch and transformers (seconds), and checking the family
# name of a config, all `train.py --help` or a config mistake needs, should not.
FAMILIES: dict[str, str] = {name: f"minivlm.models.{name}"
                            for name in ("paligemma", "idefics2", "idefics", "smolvlm", "llava_phi2", "qwen2_5_vl",
                                         "qwen2_vl", "qwen3_vl", "gemma3", "smolvlm2",
                                         "llava_onevision", "internvl", "mistral3", "mllama")}
DEFAULT = "paligemma"  # model.family when a config leaves it out


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


@dataclass
class Layout:
    """What the memory planner (plan.py) needs to know of a family's model, beyond its parameters."""
    text: object  # the decoder's config: hidden_size, intermediate_size, heads, layers, vocab_size
    vision_width: int  # the tower's hidden size
    vision_intermediate: int  # ... and its MLP's
    image_tokens: int  # image positions per sample in the text sequence (0: images enter by cross-attention)
    images: int  # images per sample through the tower (crops and tiles count)
    patches: int  # positions per image inside the tower
    how: str  # how image_tokens was counted, for the plan's printout
    cross_attention_layers: int = 0  # blocks every text token also goes through (IDEFICS's gated ones)
    vision_hidden_states: int = 2  # hidden states the tower hands back (LLaVA asks for all of them)
    connector_saved_width: int = 0  # per patch, what a connector trained in full keeps for backward
    # Llama 3.2 Vision: the vision positions per sample that its cross-attention layers read, and
    # how many such layers project them into keys and values of their own.
    vision_states: int = 0
    vision_state_readers: int = 0
    # (image tokens, images through the tower) of each image when a sample holds several, for a
    # processor that treats them differently then (LLaVA-OneVision drops its anyres crops); None:
    # as one image alone.
    several: tuple[int, int] | None = None
    video_patches: int = 0  # positions through the tower per sample for its video (data.video_column)


def per_sample(layout: Layout, images: int) -> Layout:
    """`layout` (one image's) for samples of `images` images (data.max_images): each its own tokens
    in the text, its own pass through the tower, its own vision states."""
    if images == 1:
        return layout
    tokens, views = layout.several or (layout.image_tokens, layout.images)
    how = f"{tokens} image tokens, {views} through the tower" if layout.several else layout.how
    return dataclasses.replace(layout, image_tokens=tokens * images, images=views * images,
                               vision_states=layout.vision_states * images, how=f"{images} images per sample, each {how}")


def from_config(model_class, path: str, dtype) -> object:
    """A transformers model built from its config.json alone: every family's skeleton but LLaVA-Phi's."""
    from transformers import AutoConfig  # here, not above: config.py imports this package for FAMILIES

    return model_class._from_config(AutoConfig.from_pretrained(path), dtype=dtype)
