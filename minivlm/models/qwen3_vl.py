"""Qwen3-VL: Qwen2.5-VL's dynamic resolution (qwen2_5_vl.py) with a SigLIP-2-style ViT (patch 16,
learned positions interpolated to the image's grid, full attention, no windows) -> 2×2 patch
merger -> Qwen3 decoder, and two changes that cost nothing here:

- DeepStack: the merged features of three middle ViT blocks (deepstack_visual_indexes) are
  added to the image positions of the first three decoder layers' inputs;
- interleaved M-RoPE: time, row and column take turns over the rotary frequencies instead of
  holding one band each, so a column step is no longer left with only the slowest ones.

The processor also returns mm_token_type_ids (1 at image tokens), from which transformers
derives the M-RoPE positions; the batches carry it. The chat template is ChatML, as Qwen2.5-VL's,
without a default system turn. Its vision config names the width hidden_size, as Qwen2.5-VL's
does, so the memory layout is Qwen2.5-VL's too.
"""

from functools import partial

from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from minivlm.models import from_config, processor
from minivlm.models.qwen2_5_vl import (CHAT, END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES, QUANT_SKIP,  # noqa: F401
                                       RESOLUTION, generation_batch, layout, training_batch)

NAME = "Qwen3-VL"
MODEL_CLASS = Qwen3VLForConditionalGeneration
load_processor = partial(processor.load, parts=Qwen3VLProcessor)
skeleton = partial(from_config, MODEL_CLASS)

