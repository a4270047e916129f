"""SmolVLM (HuggingFaceTB/SmolVLM-Instruct): the Idefics3 architecture. SigLIP vision tower ->
pixel-shuffle connector (a linear layer over 2×2-merged patches) -> Llama-style SmolLM2 decoder.

Images are split into tiles of `max_image_size` plus a downscaled global view, each tile
written as `<row_i_col_j>` + its image tokens by the real Idefics3Processor.
"""

from functools import partial

from transformers import Idefics3ForConditionalGeneration

from minivlm.models import chat

MODEL_CLASS = Idefics3ForConditionalGeneration
QUANT_SKIP = ["vision_model", "connector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_model", "connector"]
END_OF_TURN = "<end_of_utterance>"

load_processor = chat.load_processor
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
