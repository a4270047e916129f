"""Loading a checkpoint's own processor, at the resolution the config asks for.

Resolution is the user's to set: a high-resolution image is thousands of tokens (Qwen2.5-VL
takes up to 16384 per image by default), the first cause of out-of-memory in VLM fine-tuning.
Each family names the controls its processor has (RESOLUTION: Qwen's min_pixels/max_pixels,
Idefics3's size/max_image_size/do_image_splitting, Gemma 3's pan-and-scan...), and
`model.processor` in the config sets them, passed through as the processor names them. The
memory planner (plan.py) counts image tokens with the same values.

The processors of models that also read video (Qwen-VL, SmolVLM2, LLaVA-OneVision, InternVL)
hold a video processor, and transformers' video processors need torchvision, which cannot be
installed beside this project's torch. Without it AutoProcessor refuses to load them at all;
`load(..., parts=<the processor class>)` then builds the processor from its parts, `ImagesOnly`
in the video processor's place: images work exactly as with the real one, a video is one clear
error. A family that reads video here passes its own stand-in (`video=`): its frames through the
image processor's own PIL operations (`video_pixels`), laid out as transformers' video processor
lays them, with the checkpoint's video_preprocessor_config.json (`saved_video_config`) and
model.video_processor's keys. (Saved, such a processor writes an empty video processor entry;
loading it where torchvision is installed is untested here.) Mistral 3's PixtralProcessor reads
no video, but transformers only exports it with torchvision installed: `pixtral_processor()`
imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
import transformers.processing_utils
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.image_utils import SizeDict
from transformers.utils import cached_file, is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin


# A processor's __init__ checks each part's class by looking its base class up in transformers'
# namespace, which exports the video processors' base only when torchvision is there.
transformers.processing_utils.transformers_module.VideoProcessorMixin = VideoProcessorMixin


class StandIn(VideoProcessorMixin):
    """What stands in for a processor's video processor where torchvision is missing. Saves nothing,
    so a processor saved from here reloads with the checkpoint's real video processor elsewhere."""

    def save_pretrained(self, *args, **kwargs) -> list:
        return []

    def to_dict(self) -> dict:
        return {}


class ImagesOnly(StandIn):
    """The stand-in of a family that reads no video here: a video is one clear error."""

    def __call__(self, *args, **kwargs):
        raise ValueError("videos need transformers' video processors, which need torchvision; this environment "
                         "has none (it cannot be installed beside torch 2.13): train on images, or install "
                         "torchvision where it fits your torch")

    def __getattr__(self, name: str):
        # The video settings a processor reads in passing, with no video in sight (SmolVLM2's
        # apply_chat_template takes num_frames and fps as defaults): there are none here.
        if name.startswith("_"):
            raise AttributeError(name)
        return None


def load(name_or_path: str, trust_remote_code: bool = False, parts: type | None = None, video: type | None = None,
         video_resolution: dict | None = None, **resolution):
    """The checkpoint's processor; its image processor built with `resolution` (model.processor).
    `parts`: the family's processor class, if AutoProcessor cannot build it without torchvision;
    `video`: then the family's own video processor without torchvision (else ImagesOnly), built
    from the image processor, the checkpoint's saved video settings and `video_resolution`
    (model.video_processor), which win over them."""
    if parts is not None and not is_torchvision_available():
        processor = _from_parts(parts, name_or_path, resolution, video, video_resolution or {})
    else:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if resolution:  # from_pretrained's kwargs override the saved config before __init__ reads it
            processor.image_processor = AutoImageProcessor.from_pretrained(name_or_path, **resolution)
    # Some processors pass call-time defaults of their own that override the image processor's
    # settings (Gemma 3: do_pan_and_scan=False, whatever the image processor says): set ours there.
    defaults = getattr(type(processor), "images_kwargs", {})
    processor.images_kwargs = {**defaults, **{k: v for k, v in resolution.items() if k in defaults}}
    return processor


def call_settings(saved: dict, processor_class: str | None) -> dict:
    """The image settings a call of the processor uses, for the planner: the image processor's
    saved ones under the processor class's call-time defaults, which win over them (InternVL's
    crop_to_patches, Gemma 3's pan-and-scan); model.processor's keys win over both (load())."""
    try:
        defaults = getattr(getattr(transformers, processor_class or "", None), "images_kwargs", {})
    except ImportError:  # a processor class transformers exports only with torchvision (Pixtral's, which has none)
        defaults = {}
    return {**saved, **defaults}


def _from_parts(cls: type, name_or_path: str, resolution: dict, video: type | None, video_resolution: dict):
    processor_dict, kwargs = cls.get_processor_dict(name_or_path)  # chat template and processor_config.json
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, **resolution)
    parts = {"image_processor": image_processor, "tokenizer": AutoTokenizer.from_pretrained(name_or_path),
             "video_processor": (video(image_processor, saved_video_config(name_or_path), **video_resolution)
                                 if video else ImagesOnly())}
    return cls.from_args_and_dict([parts[a] for a in cls.get_attributes()], processor_dict, **kwargs)


def saved_video_config(name_or_path: str) -> dict:
    """The checkpoint's video_preprocessor_config.json ({} without one: transformers then builds the
    video processor from the image processor's config, as the stand-ins do)."""
    path = cached_file(name_or_path, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else {}


def video_pixels(image_processor, videos: list[list[Image.Image]], height: int, width: int, saved: dict) -> torch.Tensor:
    """A batch's videos as one tensor (videos, frames, 3, height, width), each frame written as
    `image_processor` writes an image: resized to height × width with its resample filter,
    rescaled, normalized with its mean and std (the `saved` video config's where it has its own).
    Those are the steps of transformers' BaseVideoProcessor, by PIL instead of torchvision, whose
    filters may differ in the last bits. A shorter video holds its last frame up to the longest
    (transformers pads with black frames, which SmolVLM's model drops as padding while its prompt
    still counts them, as its code reads)."""
    ip, size = image_processor, SizeDict(height=height, width=width)
    mean, std = saved.get("image_mean", ip.image_mean), saved.get("image_std", ip.image_std)
    resample = saved.get("resample", ip.resample)
    most = max(len(frames) for frames in videos)
    out = []
    for frames in videos:
        for frame in list(frames) + list(frames[-1:]) * (most - len(frames)):
            pixels = ip.resize(ip.process_image(frame, do_convert_rgb=True), size, resample=resample)
            pixels = ip.normalize(ip.rescale(pixels, ip.rescale_factor), mean, std)
            out.append(torch.from_numpy(np.asarray(pixels, dtype=np.float32)))
    return torch.stack(out).unflatten(0, (len(videos), most))


def pixtral_processor() -> type:
    """transformers' PixtralProcessor. Its module imports one helper from the torchvision image
    processor's module (for _get_num_multimodal_tokens, which serving code calls; processing does
    not); the PIL image processor's module has the same function, and stands in for it here."""
    import sys

    from transformers.models.pixtral import image_processing_pil_pixtral
    sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", image_processing_pil_pixtral)
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    return PixtralProcessor


def image_token_id(processor) -> int | None:
    """The token repeated once per image feature in the text: the tokenizer's image token where it
    names one (Gemma 3's processor calls its begin-of-image marker image_token_id), else the
    processor's; None for a processor without one."""
    return getattr(processor.tokenizer, "image_token_id", None) or getattr(processor, "image_token_id", None)
