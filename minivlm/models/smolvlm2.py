"""SmolVLM2 (HuggingFaceTB/SmolVLM2-2.2B-Instruct, 500M, 256M): SmolVLM (smolvlm.py) trained on
video too. The same Idefics3 architecture, module names, tiles and chat format under
transformers' own SmolVLM classes, whose processor holds a video processor (processor.py).

Video: every frame is an image of its own, one square tile (max_image_size) and no global view,
image_seq_len tokens. The processor opens the video with a sentence ("You are provided the
following series of four frames from a 0:00:02 [H:MM:SS] video.") and puts each frame after its
time ("Frame from 00:01:"), from the video_metadata the stand-in returns. Frames travel in
pixel_values, the images' key: transformers' processor keeps one of the two when a batch holds
both, so a batch here holds images or videos, not both (VIDEO_BESIDE_IMAGES).
"""

from functools import partial

import torch
from transformers import SmolVLMForConditionalGeneration, SmolVLMProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_utils import VideoMetadata

from minivlm.models import from_config, processor
from minivlm.models.smolvlm import (CHAT, END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES, PACKING,  # noqa: F401
                                    QUANT_SKIP, RESOLUTION, VISION_BLOCKS, generation_batch, layout, training_batch)

NAME = "SmolVLM2"
MODEL_CLASS = SmolVLMForConditionalGeneration
VIDEO_RESOLUTION = ()  # a frame is one tile (max_image_size) of image_seq_len tokens: nothing to choose
VIDEO_BESIDE_IMAGES = False


class VideoFrames(processor.StandIn):
    """transformers' SmolVLMVideoProcessor without torchvision: each frame resized to the tile's
    square (transformers first fits its longest edge, then squares it; the square is what stays),
    rescaled and normalized: pixel_values (videos, frames, 3, tile, tile), a pixel_attention_mask
    of ones, and each video's metadata, its frame indices held as its frames are."""

    model_input_names = ["pixel_values", "pixel_attention_mask"]
    num_frames = fps = None  # SmolVLMProcessor.apply_chat_template reads them; frames come sampled

    def __init__(self, image_processor, saved: dict):
        self.image_processor, self.saved = image_processor, saved
        self.side = (saved.get("max_image_size") or image_processor.max_image_size)["longest_edge"]

    def __call__(self, videos: list[list], video_metadata: list[VideoMetadata], return_tensors=None,
                 **kwargs) -> BatchFeature:
        pixels = processor.video_pixels(self.image_processor, videos, self.side, self.side, self.saved)
        held = pixels.shape[1]  # the longest video's frames: a shorter one's last index is held as its frame is
        metadata = [VideoMetadata(total_num_frames=m.total_num_frames, fps=m.fps,
                                  frames_indices=list(m.frames_indices) + [m.frames_indices[-1]] * (held - len(f)))
                    for m, f in zip(video_metadata, videos)]
        mask = torch.ones_like(pixels[:, :, 0], dtype=torch.long)  # (videos, frames, h, w): no padding in a frame
        return BatchFeature({"pixel_values": pixels, "pixel_attention_mask": mask, "video_metadata": metadata})


load_processor = partial(processor.load, parts=SmolVLMProcessor, video=VideoFrames)
skeleton = partial(from_config, MODEL_CLASS)


def video_tokens(model: SmolVLMForConditionalGeneration, video: dict, frames: int) -> tuple[int, int, str]:
    """(text tokens, tower patches, how counted) of a video of `frames` frames, each one tile of
    (image_size / patch)² patches and that over scale_factor² image tokens. The opening sentence and
    the frames' times are a few text tokens more, not counted."""
    c = model.config
    v = c.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    per_frame = patches // c.scale_factor ** 2
    return frames * per_frame, frames * patches, (
        f"a video of {frames * per_frame} image tokens ({frames} frames × {per_frame}, one tile each)")
