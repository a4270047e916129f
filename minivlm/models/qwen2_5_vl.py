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

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_utils import VideoMetadata

from minivlm.models import Layout, chat, from_config, processor

NAME = "Qwen2.5-VL"
MODEL_CLASS = Qwen2_5_VLForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = None  # any number per sample, each where its <image> marker stands
QUANT_SKIP = ["visual", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["visual"]  # the ViT's blocks have gate/up/down_proj too
# lora.vision adapts every linear in here: the ViT's blocks: attn.qkv, attn.proj, mlp.{gate,up,down}_proj;
# not visual.merger, the projector.
VISION_BLOCKS = "visual.blocks"
RESOLUTION = ("min_pixels", "max_pixels")  # h·w bounds of each image, in pixels
END_OF_TURN = "<|im_end|>"

VIDEO_RESOLUTION = ("min_pixels", "max_pixels")  # h·w bounds of each video frame, in pixels
PACKING = True  # data.packing: samples end to end in one row, M-RoPE positions per sample (rope_positions)


class VideoFrames(processor.StandIn):
    """Qwen2-VL's video processor without torchvision (processor.py): a video is its frames, each
    resized, rescaled and normalized by the image processor as an image is, at the video's own
    min/max pixels, then paired along time. The image processor writes every image as a still
    video of temporal_patch_size (2) equal frames, patches (h, w) ordered as the video processor
    orders them within a time step; a video keeps one copy per frame and puts frame pairs in the
    two time slots: (t/2 · h/14 · w/14, 3 · 2 · 14 · 14) patches, grid (t/2, h/14, w/14), the layout
    of transformers' Qwen2VLVideoProcessor.patchify (tests/test_video.py checks it against that
    code). An odd frame count repeats the last frame, as it does. Resized by PIL, not torchvision:
    pixels may differ from the real video processor's by the two libraries' bicubic filters."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor, saved: dict, min_pixels: int | None = None, max_pixels: int | None = None,
                 temporal_patch_size: int = 2):
        self.image_processor, self.temporal_patch_size = image_processor, temporal_patch_size
        # model.video_processor's bounds, else the checkpoint's video_preprocessor_config.json's, else
        # the images': transformers builds Qwen's video processor from preprocessor_config.json too
        # when a checkpoint has no video config of its own.
        bounds = {**self.default_size(image_processor), **saved.get("size", {})}
        self.size = {"shortest_edge": min_pixels or bounds["shortest_edge"],
                     "longest_edge": max_pixels or bounds["longest_edge"]}
        self.merge_size, self.patch_size = image_processor.merge_size, image_processor.patch_size

    @staticmethod
    def default_size(image_processor) -> dict:
        size = image_processor.size  # a SizeDict
        return {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}

    def resized(self, frames: list) -> tuple[list, dict]:
        """The frames and the bounds the image processor resizes each within: the video's own
        min/max pixels, per frame."""
        return frames, self.size

    def __call__(self, videos: list[list], video_metadata: list | None = None, return_tensors=None,
                 **kwargs) -> BatchFeature:
        t, p = self.temporal_patch_size, self.patch_size
        patches, grids = [], []
        for frames in videos:
            frames, size = self.resized(list(frames))
            frames = frames + frames[-1:] * (-len(frames) % t)
            out = self.image_processor(images=frames, size=size, return_tensors="pt")
            _, h, w = out["image_grid_thw"][0].tolist()
            one = out["pixel_values"].view(len(frames), h * w, 3, t, p, p)[:, :, :, 0]  # each frame once
            paired = one.view(len(frames) // t, t, h * w, 3, p, p).permute(0, 2, 3, 1, 4, 5)
            patches.append(paired.reshape(len(frames) // t * h * w, 3 * t * p * p))
            grids.append([len(frames) // t, h, w])
        # Qwen2.5-VL's processor reads each video's frame rate here (its second_per_grid_ts); Qwen's 2 fps if not given.
        rates = video_metadata or [VideoMetadata(total_num_frames=len(f), fps=2.0, frames_indices=list(range(len(f))))
                                   for f in videos]
        return BatchFeature({"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": rates})


load_processor = partial(processor.load, parts=Qwen2_5_VLProcessor, video=VideoFrames)
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def rope_positions(model: Qwen2_5_VLForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, rows, seq) M-RoPE positions of a padded batch, each row's from its own 0: transformers'
    get_rope_index, which the model calls itself when given no position_ids (packing.py gives it some)."""
    media = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if key in batch}
    positions, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                              attention_mask=batch["attention_mask"], **media)
    return positions


def image_tokens(vision, preprocessor: dict) -> tuple[int, str]:
    """(tokens, how counted) of the largest image max_pixels allows: max_pixels / (patch · merge)²."""
    side = vision.patch_size * vision.spatial_merge_size
    max_pixels = preprocessor.get("max_pixels") or preprocessor.get("size", {}).get("longest_edge", 12845056)
    n = max_pixels // side ** 2
    return n, (f"up to {n} image tokens (max_pixels {max_pixels} / {side}²"
               f"{'' if preprocessor else '; no preprocessor_config.json, the default max_pixels assumed'})")


def video_tokens(model: Qwen2_5_VLForConditionalGeneration, video: dict, frames: int) -> tuple[int, int, str]:
    """(text tokens, tower patches, how counted) of a video of `frames` frames at the largest frame
    the video's max_pixels allows (`video`: the video processor's settings): frame pairs × the
    tokens of one such frame, each token merge² patches."""
    v = model.config.vision_config
    steps = -(-frames // 2)  # frame pairs, an odd last frame repeated
    per_step, _ = image_tokens(v, video)
    return steps * per_step, steps * per_step * v.spatial_merge_size ** 2, (
        f"a video of up to {steps * per_step} video tokens ({frames} frames in {steps} pairs × {per_step})")


def layout(model: Qwen2_5_VLForConditionalGeneration, preprocessor: dict) -> Layout:
    """One image of image_tokens(), each token merge² patches of the ViT."""
    c = model.config
    v = c.vision_config
    n, how = image_tokens(v, preprocessor)
    return Layout(c.get_text_config(), v.hidden_size, v.intermediate_size, n, 1, n * v.spatial_merge_size ** 2, how)
