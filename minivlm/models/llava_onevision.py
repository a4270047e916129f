"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf): SigLIP at 384 px (27 × 27
patches) -> 2-layer MLP projector -> Qwen2 decoder, in ChatML.

AnyRes: the processor picks, among image_grid_pinpoints, the resolution that best fits the
image, cuts it into crops of 384 px and adds the whole image scaled down: 1 + crops images
through the tower (only the whole image when a sample holds several). In the text the whole image is 729 tokens, the crops one grid of features
with the padding cropped away and an image_newline after each row; a grid of more than
anyres_max_9 crops' worth (9 × 729) is interpolated down to about that. The model splits the
tower's output by the same pinpoints, read from its own config: image_grid_pinpoints is set on
both (MODEL_RESOLUTION), or features and image tokens would not match.

Video: each frame is one 384 px view through the tower (no crops), its 27 × 27 features pooled
2 × 2 (bilinear) to 14 × 14, the video ended by one image_newline: frames · 14² + 1 tokens. The
chat template writes a turn's images, then its videos, then its text, wherever the markers were.
"""

import math
from functools import partial

from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from transformers.feature_extraction_utils import BatchFeature

from minivlm.models import Layout, chat, from_config, processor

NAME = "LLaVA-OneVision"
MODEL_CLASS = LlavaOnevisionForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
PACKING = True  # data.packing (packing.py): samples end to end in one row
QUANT_SKIP = ["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_tower", "multi_modal_projector"]
# lora.vision adapts every linear in here: SigLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_tower"
RESOLUTION = ("image_grid_pinpoints",)  # [[height, width], ...]: the grids of 384 px crops allowed
MODEL_RESOLUTION = ("image_grid_pinpoints",)
END_OF_TURN = "<|im_end|>"
VIDEO_RESOLUTION = ()  # a frame is the tower's own size (the image processor's): nothing to choose


class VideoFrames(processor.StandIn):
    """transformers' LlavaOnevisionVideoProcessor without torchvision: each frame resized to the
    video config's size (else the images': 384 × 384, aspect not kept), rescaled and normalized:
    pixel_values_videos (videos, frames, 3, 384, 384), one tensor for the batch."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, image_processor, saved: dict):
        self.image_processor, self.saved = image_processor, saved
        size = saved.get("size") or image_processor.size
        self.height, self.width = size["height"], size["width"]

    def __call__(self, videos: list[list], return_tensors=None, **kwargs) -> BatchFeature:
        pixels = processor.video_pixels(self.image_processor, videos, self.height, self.width, self.saved)
        return BatchFeature({"pixel_values_videos": pixels})


load_processor = partial(processor.load, parts=LlavaOnevisionProcessor, video=VideoFrames)
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: LlavaOnevisionForConditionalGeneration, preprocessor: dict) -> Layout:
    """The largest grid the pinpoints allow: its crops' features (capped at anyres_max_N crops'
    worth, as the processor caps them) and a newline per row, plus the whole image's."""
    c = model.config
    v = c.vision_config
    side = v.image_size // v.patch_size  # features per crop edge: 27
    pinpoints = preprocessor.get("image_grid_pinpoints") or c.image_grid_pinpoints
    most = int(c.vision_aspect_ratio.removeprefix("anyres_max_"))

    def grid_tokens(height: int, width: int) -> int:
        rows, cols = side * height // v.image_size, side * width // v.image_size
        ratio = math.sqrt(rows * cols / (most * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows * cols + rows

    n = side ** 2 + max(grid_tokens(h, w) for h, w in pinpoints)
    crops = max(h * w // v.image_size ** 2 for h, w in pinpoints)
    how = (f"up to {n} image tokens ({side}² for the whole image + a grid of up to {crops} crops, "
           f"newlines included, capped at {c.vision_aspect_ratio})")
    # Several images a sample: each is the whole image alone, no crops (the image processor's
    # need_patching), and a newline (less the CLS under the "default" feature strategy).
    alone = side ** 2 + 1 - (c.vision_feature_select_strategy == "default")
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, 1 + crops, side ** 2, how,
                  vision_hidden_states=v.num_hidden_layers + 1, several=(alone, 1))


def video_tokens(model: LlavaOnevisionForConditionalGeneration, video: dict, frames: int) -> tuple[int, int, str]:
    """(text tokens, tower patches, how counted) of a video of `frames` frames: each frame's
    side² features pooled to ⌈side/2⌉², and one newline."""
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    pooled = math.ceil(side / 2) ** 2
    tokens = frames * pooled + 1
    how = f"a video of {tokens} video tokens ({frames} frames × {pooled} pooled + 1 newline)"
    return tokens, frames * side ** 2, how
