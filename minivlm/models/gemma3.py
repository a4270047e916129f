"""Gemma 3 (4B, 12B, 27B): SigLIP vision tower -> average-pooled to mm_tokens_per_image (256) soft
tokens -> linear projector -> Gemma 3 decoder, in Gemma's chat format ("model" is the assistant).

The text holds <start_of_image>, which the processor expands to "\\n\\n<start_of_image>" + 256 ×
<image_soft_token> + "<end_of_image>\\n\\n" and marks with token_type_ids = 1. In training the
model reads token_type_ids to attend *bidirectionally* among one image's soft tokens (causally
everywhere else), as PaliGemma does over its prefix; the batches carry them, so nothing here
builds that mask. Pan-and-scan (do_pan_and_scan) cuts an image of extreme aspect ratio into up
to pan_and_scan_max_num_crops crops, each 256 tokens more, besides the whole image.
"""

from functools import partial

from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

from minivlm.models import Layout, chat, from_config, processor

NAME = "Gemma 3"
MODEL_CLASS = Gemma3ForConditionalGeneration
CHAT = True  # a chat template: a system turn (folded into the first user turn) and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
PACKING = True  # data.packing (packing.py): its images' bidirectional attention stays within each sample
QUANT_SKIP = ["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_tower", "multi_modal_projector"]
# lora.vision adapts every linear in here: SigLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_tower"
RESOLUTION = ("do_pan_and_scan", "pan_and_scan_max_num_crops", "pan_and_scan_min_crop_size",
              "pan_and_scan_min_ratio_to_activate")
END_OF_TURN = "<end_of_turn>"

load_processor = processor.load
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: Gemma3ForConditionalGeneration, preprocessor: dict) -> Layout:
    """mm_tokens_per_image per view: the whole image, and with pan-and-scan up to max_num_crops crops."""
    c = model.config
    v = c.vision_config
    # The checkpoints save these as null: the processor's own call-time defaults hold them.
    setting = {key: default if preprocessor.get(key) is None else preprocessor[key]
               for key, default in Gemma3Processor.images_kwargs.items()}
    crops = setting["pan_and_scan_max_num_crops"] if setting["do_pan_and_scan"] else 0
    n = c.mm_tokens_per_image * (1 + crops)
    how = (f"{n} image tokens ({c.mm_tokens_per_image} per view × (1 image"
           f"{f' + up to {crops} pan-and-scan crops' if crops else ', no pan-and-scan'}))")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, 1 + crops,
                  (v.image_size // v.patch_size) ** 2, how)
