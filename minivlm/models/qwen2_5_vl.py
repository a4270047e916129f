"""Qwen2.5-VL: a ViT at the image's own resolution (2-D rotary positions, window attention) ->
patch merger (each 2×2 of patches -> one token, an MLP) -> Qwen2.5 decoder with M-RoPE.

Dynamic resolution: the processor resizes each image to multiples of patch_size · merge_size
(14 · 2 = 28 px) with min_pixels ≤ h·w ≤ max_pixels, keeping its aspect ratio, so an image is
(h/28)·(w/28) tokens: 16384 at the checkpoints' default max_pixels. pixel_values holds the
patches of every image in the batch end to end, image_grid_thw (frames, h/14, w/14) per image
says which are whose.

M-RoPE: a token's rotary position is three numbers (time, row, column); text tokens advance
all three together, an image's tokens share one time and take their own row and column.
transformers derives them from input_ids, image_grid_thw and the attention mask (left padding
included), so training and batched generation need nothing here but the chat template's turns.
"""

from functools import partial

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from minivlm.models import Layout, chat, from_config, processor

NAME = "Qwen2.5-VL"
MODEL_CLASS = Qwen2_5_VLForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
QUANT_SKIP = ["visual", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["visual"]  # the ViT's blocks have gate/up/down_proj too
RESOLUTION = ("min_pixels", "max_pixels")  # h·w bounds of each image, in pixels
END_OF_TURN = "<|im_end|>"

load_processor = partial(processor.load, parts=Qwen2_5_VLProcessor)
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def image_tokens(vision, preprocessor: dict) -> tuple[int, str]:
    """(tokens, how counted) of the largest image max_pixels allows: max_pixels / (patch · merge)²."""
    side = vision.patch_size * vision.spatial_merge_size
    max_pixels = preprocessor.get("max_pixels") or preprocessor.get("size", {}).get("longest_edge", 12845056)
    n = max_pixels // side ** 2
    return n, (f"up to {n} image tokens (max_pixels {max_pixels} / {side}²"
               f"{'' if preprocessor else '; no preprocessor_config.json, the default max_pixels assumed'})")


def layout(model: Qwen2_5_VLForConditionalGeneration, preprocessor: dict) -> Layout:
    """One image of image_tokens(), each token merge² patches of the ViT."""
    c = model.config
    v = c.vision_config
    n, how = image_tokens(v, preprocessor)
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, 1, n * v.spatial_merge_size ** 2, how)
