"""SmolVLM (HuggingFaceTB/SmolVLM-Instruct): the Idefics3 architecture. SigLIP vision tower ->
pixel-shuffle connector (a linear layer over 2×2-merged patches) -> Llama-style SmolLM2 decoder.

Images are split into tiles of `max_image_size` plus a downscaled global view, each tile
written as `<row_i_col_j>` + its image tokens by the real Idefics3Processor. Idefics3 keeps
Idefics2's module names (vision_model, connector, text_model) and its chat format, so only the
model class differs.
"""

from transformers import Idefics3ForConditionalGeneration

from minivlm.models.idefics2 import (END_OF_TURN, LORA_SKIP, LORA_TARGETS, QUANT_SKIP,  # noqa: F401
                                     generation_batch, load_processor, training_batch)

NAME = "SmolVLM"
MODEL_CLASS = Idefics3ForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
