"""InternVL 3 / 3.5 (OpenGVLab/InternVL3-*-hf): InternViT at 448 px (32 × 32 patches of 14) ->
pixel shuffle (each 2×2 of patches -> one token: 256 a tile) -> MLP projector -> Qwen2.5 (or
Qwen3) decoder, in ChatML.

Dynamic tiling: with crop_to_patches the processor cuts an image into a grid of 448 px tiles,
between min_patches and max_patches of them (the grid whose aspect ratio is nearest the
image's), plus a 448 px thumbnail of the whole: tiles + 1 images through the tower, 256 tokens
each, between <img> and </img>. The processor class turns crop_to_patches on at call time,
whatever the saved image processor says; processor.load sets model.processor's value there.
"""

from functools import partial

from transformers import InternVLForConditionalGeneration, InternVLProcessor

from minivlm.models import Layout, chat, from_config, processor

NAME = "InternVL"
MODEL_CLASS = InternVLForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
PACKING = True  # data.packing (packing.py): samples end to end in one row
QUANT_SKIP = ["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_tower", "multi_modal_projector"]  # the ViT's attention has q/k/v_proj too
# lora.vision adapts every linear in here: InternViT's layers: attention.{q,k,v}_proj, projection_layer, mlp.fc1/fc2.
VISION_BLOCKS = "vision_tower"
RESOLUTION = ("crop_to_patches", "min_patches", "max_patches")
END_OF_TURN = "<|im_end|>"

load_processor = partial(processor.load, parts=InternVLProcessor)
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: InternVLForConditionalGeneration, preprocessor: dict) -> Layout:
    """max_patches tiles and the thumbnail when tiling is on, else the one image; each
    (image_size / patch)² · downsample_ratio² tokens."""
    c = model.config
    v = c.vision_config
    patches = (v.image_size[0] // v.patch_size[0]) * (v.image_size[1] // v.patch_size[1])
    per_tile = int(patches * c.downsample_ratio ** 2)
    setting = {"max_patches": 12, **InternVLProcessor.images_kwargs, **preprocessor}
    tiles = setting["max_patches"] if setting["crop_to_patches"] else 1
    images = tiles + 1 if tiles > 1 else tiles  # a single tile is the whole image: no thumbnail
    how = (f"up to {per_tile * images} image tokens ({per_tile}/tile × "
           f"{f'({tiles} tiles + the thumbnail)' if tiles > 1 else '1 image, no tiling'})")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, per_tile * images, images, patches, how)
