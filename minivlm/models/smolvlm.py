"""SmolVLM (HuggingFaceTB/SmolVLM-Instruct): the Idefics3 architecture. SigLIP vision tower ->
pixel-shuffle connector (a linear layer over 2×2-merged patches) -> Llama-style SmolLM2 decoder.

Images are split into tiles of `max_image_size` plus a downscaled global view, each tile
written as `<row_i_col_j>` + its image tokens by the real Idefics3Processor. Idefics3 keeps
Idefics2's module names (vision_model, connector, text_model) and its chat format, so only the
model class differs.
"""

import math
from functools import partial

from transformers import Idefics3ForConditionalGeneration

from minivlm.models import Layout, from_config

from minivlm.models.idefics2 import (END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES,  # noqa: F401
                                     PACKING, QUANT_SKIP, VISION_BLOCKS, generation_batch, load_processor, training_batch)

NAME = "SmolVLM"
MODEL_CLASS = Idefics3ForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
# size.longest_edge: the image is resized to fit it; max_image_size.longest_edge: the tile it
# is cut into (with do_image_splitting), each tile (image_size/patch)²/scale_factor² tokens.
RESOLUTION = ("size", "max_image_size", "do_image_splitting")
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: Idefics3ForConditionalGeneration, preprocessor: dict) -> Layout:
    """Tiles of max_image_size over the image's longest edge, plus one global view, each (image_size /
    patch_size)² / scale_factor² tokens after the pixel shuffle."""
    c = model.config
    v = c.vision_config
    per_tile = (v.image_size // v.patch_size) ** 2 // c.scale_factor ** 2
    tile = preprocessor.get("max_image_size", {}).get("longest_edge", v.image_size)
    longest = preprocessor.get("size", {}).get("longest_edge", 4 * tile)
    grid = math.ceil(longest / tile) if preprocessor.get("do_image_splitting", True) else 0
    tiles = grid * grid + 1
    how = (f"{per_tile * tiles} image tokens ({per_tile}/tile × ({grid}×{grid} tiles + 1 global)"
           f"{'' if preprocessor else '; no preprocessor_config.json, 4×4 tiles assumed'})")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, per_tile * tiles, tiles,
                  (v.image_size // v.patch_size) ** 2, how)
