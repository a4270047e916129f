"""Samples in, the family's tensors out: a training batch with its label mask, what the loss reads.

data.py reads rows and turns them into (images, dialog) samples; here they become the family's
processor tensors, with `labels` (-100 where no loss is taken), too-long samples dropped, random
crops drawn. steps.py decides which samples go into which step.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import ModuleType

import datasets
import torch
import torch.nn.functional as F
from PIL import Image

from minivlm.config import Config, ConfigError, DataConfig
from minivlm.data import Rows, usable_samples
from minivlm.models import FAMILIES, get_family
from minivlm.models.chat import Media, Video
from minivlm.models.processor import image_token_id


def check_images(family: ModuleType, most: int, where: str) -> None:
    """Refuse `most` images per sample for a family that takes fewer (MAX_IMAGES); `where` says
    whose count it is (data.max_images, or a sample's)."""
    if family.MAX_IMAGES is not None and most > family.MAX_IMAGES:
        several = [name for name in FAMILIES if get_family(name).MAX_IMAGES is None]
        raise ConfigError(f"{family.NAME} takes {family.MAX_IMAGES} image per sample and {where} {most}; "
                          f"several images per sample need one of {', '.join(several)}")


def check_video(family: ModuleType, cfg: Config) -> None:
    """Refuse video (data.video_column, model.video_processor) for a family that reads none here, and
    a video resolution key its video processor does not have."""
    keys = getattr(family, "VIDEO_RESOLUTION", None)
    if (cfg.data.video_column or cfg.model.video_processor) and keys is None:
        readers = [name for name in FAMILIES if hasattr(get_family(name), "VIDEO_RESOLUTION")]
        raise ConfigError(f"{family.NAME} reads no video here (data.video_column, model.video_processor); "
                          f"video needs one of {', '.join(readers)}")
    unknown = sorted(set(cfg.model.video_processor) - set(keys or ()))
    if unknown:
        has = f"its resolution controls are {', '.join(keys)}" if keys else "it has none to set"
        raise ConfigError(f"model.video_processor: {family.NAME}'s has no {', '.join(unknown)}; {has}")


def check_samples(family: ModuleType, images: list[list[Image.Image]], dialogs: list[list[tuple[str, str]]],
                  system: str) -> None:
    """Refuse what a family cannot write: more images in a sample than it takes (MAX_IMAGES), images
    and videos in one batch where its processor keeps only one of them (VIDEO_BESIDE_IMAGES) and,
    without a chat template (CHAT = False), a system turn or more than one exchange in a sample.
    A ConfigError: the fix is in the config or the data."""
    check_images(family, max(map(images_in, images), default=0), "a sample here holds")
    if not getattr(family, "VIDEO_BESIDE_IMAGES", True) and any(map(images_in, images)) and any(
            isinstance(m, Video) for media in images for m in media):
        raise ConfigError(f"{family.NAME}'s processor takes a batch's images or its videos, not both (transformers "
                          "passes both as pixel_values and keeps one): give the video rows no image column, or "
                          "train on images and on videos in separate runs")
    if family.CHAT:
        return
    if system:
        raise ConfigError(f"{family.NAME} has no system turn; put the instruction into data.prompt_template "
                          "and leave data.system_prompt empty")
    if any(len(d) != 1 for d in dialogs):
        chat = [name for name in FAMILIES if get_family(name).CHAT]
        raise ConfigError(f"{family.NAME} learns one question per sample; multi-turn conversations need a "
                          f"chat-template family ({', '.join(chat)})")


def samples(ds: datasets.Dataset | Rows, indices: list[int], cfg: DataConfig, family: ModuleType,
            generator: torch.Generator | None = None) -> list[tuple[int, dict, list[Image.Image], list]]:
    """(index, row, images, dialog) of each usable sample of `ds[indices]` (see usable_samples),
    checked against the family (check_samples), without those of more than data.max_images images
    (dropped with a warning, as the memory plan counts that many) and, given a `generator`
    (training), each image randomly cropped (random_resized_crop) by the same policy."""
    usable = usable_samples(ds, indices, cfg)
    check_samples(family, [media for _, _, media, _ in usable], [dialog for *_, dialog in usable], cfg.system_prompt)
    many = [(index, images_in(media)) for index, _, media, _ in usable if images_in(media) > cfg.max_images]
    if many:
        warnings.warn(f"dropped sample(s) {', '.join(f'{i} ({n} images)' for i, n in many)}: more than "
                      f"data.max_images = {cfg.max_images}; raise it to train on them (the memory plan counts "
                      "that many images per sample)")
        usable = [sample for sample in usable if images_in(sample[2]) <= cfg.max_images]
    if cfg.random_resized_crop and generator is not None:  # images only: a video's frames are left whole
        crop = functools.partial(random_resized_crop, scale=cfg.random_resized_crop, generator=generator)
        usable = [(index, row, [m if isinstance(m, Video) else crop(m) for m in media], dialog)
                  for index, row, media, dialog in usable]
    return usable


def images_in(media: list[Media]) -> int:
    return sum(not isinstance(m, Video) for m in media)


def random_resized_crop(image: Image.Image, scale: list[float], generator: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop without the resize (the processor resizes next): a random
    region of `scale` of the area and aspect ratio in `ratio`, drawn from `generator`."""
    w, h = image.size
    for _ in range(10):
        area = w * h * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).item())
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            y = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            return image.crop((x, y, x + cw, y + ch))
    return image


def answer_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The labelled tokens that answer_positions predict, in the same row-major order: (n,)."""
    targets = batch["labels"][:, 1:]
    return targets[targets != -100]


def answer_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq) bool: the positions whose *next* token is a labelled one, the only ones whose
    logits the loss needs (the last position predicts nothing)."""
    return F.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The family's training batch for `ds[indices]`, minus bad samples (see samples) and any sample
    longer than `cfg.max_length` (see within_max_length).

    Training passes a `generator`, from which random_resized_crop draws its crops; without one
    (validation) images are not cropped.
    """
    chosen = samples(ds, indices, cfg, family, generator)
    if not chosen:  # every sample bad: a batch of zero rows, which the loop skips (no answer tokens)
        return empty_batch()
    return within_max_length(family, processor, [images for _, _, images, _ in chosen],
                             [dialog for *_, dialog in chosen], cfg, [index for index, *_ in chosen])


def empty_batch() -> dict[str, torch.Tensor]:
    """A batch of zero rows: what a step gets when none of its samples can be trained on."""
    return {key: torch.zeros(0, 0, dtype=torch.long) for key in ("input_ids", "attention_mask", "labels")}


def within_max_length(family: ModuleType, processor, images: list[list[Image.Image]], dialogs: list, cfg: DataConfig,
                      indices: list[int], rows_per_sample: int = 1) -> dict[str, torch.Tensor]:
    """The family's training batch of (images, dialogs), without the samples longer than data.max_length
    (see short_enough). The rest are processed again without them, since some processors flatten a
    batch's images into one tensor whose rows belong to no sample index (Qwen-VL's pixel_values are
    patches of every image, end to end).
    `rows_per_sample` > 1: the rows are that many blocks of len(indices) (DPO: the chosen
    answers, then the rejected ones), and a sample is dropped whole if any of its rows is too long.
    """
    batch = family.training_batch(processor, images, dialogs, system=cfg.system_prompt)
    keep = short_enough(batch, family, processor, cfg, indices, rows_per_sample)
    if keep.all():
        return batch
    if not keep.any():
        return empty_batch()
    rows = keep.repeat(rows_per_sample).tolist()
    return family.training_batch(processor, [im for im, k in zip(images, rows) if k],
                                 [d for d, k in zip(dialogs, rows) if k], system=cfg.system_prompt)


def short_enough(batch: dict[str, torch.Tensor], family: ModuleType, processor, cfg: DataConfig, indices: list[int],
                 rows_per_sample: int = 1) -> torch.Tensor:
    """(samples,) bool: which samples of a processed `batch` are at most data.max_length tokens long.

    Too-long samples are dropped with a warning that gives their length, how much of it is image
    tokens and the keys that shorten it; never truncated: truncation would cut the answer or,
    worse, image tokens, whose count the model checks against the image features ("Image
    features and image tokens do not match").
    """
    lengths = batch["attention_mask"].sum(1).view(rows_per_sample, -1)
    keep = (lengths <= cfg.max_length).all(0)
    if keep.all():
        return keep
    image_id = image_token_id(processor)
    image_tokens = ((batch["input_ids"] == image_id).sum(1) if image_id is not None
                    else torch.zeros(len(lengths.view(-1)), dtype=torch.long)).view(rows_per_sample, -1)
    too_long = [f"{i} ({lengths[:, k].max().item()} tokens, {image_tokens[:, k].max().item()} of them image tokens)"
                for k, i in enumerate(indices) if not keep[k]]
    fewer = (f", or fewer image tokens per sample with model.processor ({', '.join(family.RESOLUTION)})"
             if family.RESOLUTION else "")
    warnings.warn(f"dropped sample(s) {', '.join(too_long)}: longer than data.max_length = {cfg.max_length} "
                  f"tokens; raise data.max_length to train on them{fewer}")
    return keep
