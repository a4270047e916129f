"""Qwen2-VL: Qwen2.5-VL's predecessor, with the same dynamic resolution, M-RoPE, chat template and
module names (qwen2_5_vl.py); its ViT attends over the whole image in every block, with LayerNorm
and a GELU MLP of mlp_ratio × embed_dim, and its vision config names the width embed_dim.
"""

from functools import partial

from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from minivlm.models import Layout, from_config, processor
from minivlm.models.qwen2_5_vl import (CHAT, END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES, PACKING,  # noqa: F401
                                       QUANT_SKIP, RESOLUTION, VIDEO_RESOLUTION, VISION_BLOCKS, VideoFrames,
                                       generation_batch, image_tokens, rope_positions, training_batch, video_tokens)

NAME = "Qwen2-VL"
MODEL_CLASS = Qwen2VLForConditionalGeneration
load_processor = partial(processor.load, parts=Qwen2VLProcessor, video=VideoFrames)
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: Qwen2VLForConditionalGeneration, preprocessor: dict) -> Layout:
    c = model.config
    v = c.vision_config
    n, how = image_tokens(v, preprocessor)
    return Layout(c.get_text_config(), v.embed_dim, v.embed_dim * v.mlp_ratio, n, 1, n * v.spatial_merge_size ** 2, how)
