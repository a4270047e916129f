"""Mistral 3 (mistralai/Mistral-Small-3.1-24B-Instruct-2503, 3.2): Pixtral ViT at the image's own
resolution (patches of 14, 2-D rotary positions, up to longest_edge px) -> patch merger (each
2×2 of patches -> one token) -> MLP projector -> Mistral decoder, in Mistral's [INST] format.

The processor resizes each image to fit size.longest_edge (1540), keeping its aspect ratio, in
multiples of 28 px, and writes one [IMG] a token, an [IMG_BREAK] after each row and [IMG_END]
last: (h/28)·(w/28 + 1) tokens. An answer ends with eos (</s>), the template's end of turn.
transformers exports PixtralProcessor only with torchvision (processor.pixtral_processor).
"""

from functools import partial

from transformers import Mistral3ForConditionalGeneration

from minivlm.models import Layout, chat, from_config, processor

NAME = "Mistral 3"
MODEL_CLASS = Mistral3ForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
PACKING = True  # data.packing (packing.py): samples end to end in one row
QUANT_SKIP = ["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_tower", "multi_modal_projector"]  # the ViT's blocks have the same names
# lora.vision adapts every linear in here: Pixtral's layers: attention.{q,k,v,o}_proj, feed_forward.{gate,up,down}_proj.
VISION_BLOCKS = "vision_tower"
RESOLUTION = ("size",)  # {"longest_edge": px}
END_OF_TURN = "</s>"

load_processor = partial(processor.load, parts=processor.pixtral_processor())
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: Mistral3ForConditionalGeneration, preprocessor: dict) -> Layout:
    """A square image at size.longest_edge: (edge/28)² image tokens, and a break (or the end) per row."""
    c = model.config
    v = c.vision_config
    edge = preprocessor.get("size", {}).get("longest_edge", v.image_size)
    side = edge // (v.patch_size * c.spatial_merge_size)
    how = (f"up to {side * side} image tokens ({side}×{side} of {v.patch_size * c.spatial_merge_size} px at "
           f"longest_edge {edge}) + {side} row breaks")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, side * (side + 1), 1,
                  (edge // v.patch_size) ** 2, how, vision_hidden_states=v.num_hidden_layers + 1)
