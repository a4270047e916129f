"""Qwen3-VL: Qwen2.5-VL's dynamic resolution (qwen2_5_vl.py) with a SigLIP-2-style ViT (patch 16,
learned positions interpolated to the image's grid, full attention, no windows) -> 2×2 patch
merger -> Qwen3 decoder, and two changes that cost nothing here:

- DeepStack: the merged features of three middle ViT blocks (deepstack_visual_indexes) are
  added to the image positions of the first three decoder layers' inputs;
- interleaved M-RoPE: time, row and column take turns over the rotary frequencies instead of
  holding one band each, so a column step is no longer left with only the slowest ones.

The processor also returns mm_token_type_ids (1 at image tokens, 2 at video tokens), from which
transformers derives the M-RoPE positions; the batches carry it.

Video differs from Qwen2.5-VL's in two ways (VideoFrames below). The video's min/max pixels bound
the whole clip, frames × height × width, not each frame: more frames, smaller frames. And each
frame pair's tokens follow a text timestamp, "<1.2 seconds>", from the frames' indices and rate
(the processor writes it from the video_metadata the stand-in returns), where Qwen2.5-VL put
the time into the rotary positions instead. The chat template is ChatML, as Qwen2.5-VL's,
without a default system turn. Its vision config names the width hidden_size, as Qwen2.5-VL's
does, so the memory layout is Qwen2.5-VL's too.
"""

from functools import partial

from PIL import Image
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
# Its module imports torchvision only if present; smart_resize is plain arithmetic.
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

from minivlm.models import from_config, processor, qwen2_5_vl
from minivlm.models.qwen2_5_vl import (CHAT, END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES,  # noqa: F401
                                       PACKING, QUANT_SKIP, RESOLUTION, VIDEO_RESOLUTION, VISION_BLOCKS,
                                       generation_batch, layout, rope_positions, training_batch)

NAME = "Qwen3-VL"
MODEL_CLASS = Qwen3VLForConditionalGeneration


class VideoFrames(qwen2_5_vl.VideoFrames):
    """Qwen2.5-VL's stand-in (same patches, same grid) with Qwen3-VL's resize: one size for every
    frame from transformers' own smart_resize over (frames, height, width), min/max pixels bounding
    the clip's frames × height × width, each side a multiple of patch · merge (32). Without a
    video config of the checkpoint's own the bounds are Qwen3VLVideoProcessor's, not the images'."""

    @staticmethod
    def default_size(image_processor) -> dict:
        return Qwen3VLVideoProcessor.size

    def resized(self, frames: list[Image.Image]) -> tuple[list[Image.Image], dict]:
        width, height = frames[0].size
        # transformers refuses a clip shorter than a frame pair here; one frame is sized as a pair
        h, w = smart_resize(max(len(frames), self.temporal_patch_size), height, width, self.temporal_patch_size,
                            self.patch_size * self.merge_size, self.size["shortest_edge"], self.size["longest_edge"])
        frames = [f.convert("RGB").resize((w, h), Image.Resampling.BICUBIC) for f in frames]
        return frames, {"shortest_edge": h * w, "longest_edge": h * w}  # already that size: kept as it is


load_processor = partial(processor.load, parts=Qwen3VLProcessor, video=VideoFrames)
skeleton = partial(from_config, MODEL_CLASS)


def video_tokens(model: Qwen3VLForConditionalGeneration, video: dict, frames: int) -> tuple[int, int, str]:
    """(text tokens, tower patches, how counted) of the largest video of `frames` frames. smart_resize
    keeps frames' × height × width within max_pixels (the video config's size.longest_edge), frames'
    being the count rounded to pairs while that holds, the count itself once it shrinks them: a
    frame is at most max_pixels / min(both) pixels, a pair's tokens that over (patch · merge)². The
    timestamps' few text tokens per pair are not counted."""
    v = model.config.vision_config
    most = (video.get("max_pixels") or video.get("size", {}).get("longest_edge")
            or Qwen3VLVideoProcessor.size["longest_edge"])
    n = max(frames, 2)  # as VideoFrames.resized sizes one frame
    steps = -(-frames // 2)
    per_step = most // min(n, round(n / 2) * 2) // (v.patch_size * v.spatial_merge_size) ** 2
    return steps * per_step, steps * per_step * v.spatial_merge_size ** 2, (
        f"a video of up to {steps * per_step} video tokens ({frames} frames in {steps} pairs × {per_step}; "
        f"max_pixels {most} over the clip)")
