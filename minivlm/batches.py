"""Samples in, the family's tensors out: a training batch with its label mask, what the loss reads.

data.py reads rows and turns them into (image, dialog) samples; here they become the family's
processor tensors, with `labels` (-100 where no loss is taken), too-long samples dropped, random
crops drawn. steps.py decides which samples go into which step.
"""

from __future__ import annotations

import math
import warnings
from types import ModuleType

import datasets
import torch
import torch.nn.functional as F
from PIL import Image

from minivlm.config import ConfigError, DataConfig
from minivlm.data import usable_samples
from minivlm.models import FAMILIES, get_family


def check_dialogs(family: ModuleType, dialogs: list[list[tuple[str, str]]], system: str) -> None:
    """Refuse what a family without a chat template (CHAT = False) cannot write: a system turn, or
    more than one exchange in a sample. A ConfigError: the fix is in the config or the data."""
    if family.CHAT:
        return
    if system:
        raise ConfigError(f"{family.NAME} has no system turn; put the instruction into data.prompt_template "
                          "and leave data.system_prompt empty")
    if any(len(d) != 1 for d in dialogs):
        chat = [name for name in FAMILIES if get_family(name).CHAT]
        raise ConfigError(f"{family.NAME} learns one question per sample; multi-turn conversations need a "
                          f"chat-template family ({', '.join(chat)})")


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


def answer_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq) bool: the positions whose *next* token is a labelled one, the only ones whose
    logits the loss needs (the last position predicts nothing)."""
    return F.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType,
            processor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The family's training batch for `ds[indices]`, minus bad samples (see usable_samples) and
    any sample longer than `cfg.max_length`.

    Too-long samples are dropped, never truncated: truncation would cut the answer or, worse,
    image tokens, whose count the model checks against the image features. Training passes a
    `generator`, from which random_resized_crop draws its crops; without one (validation)
    images are not cropped.
    """
    samples = usable_samples(ds, indices, cfg)
    if not samples:  # every sample bad: a batch of zero rows, which the loop skips (no answer tokens)
        return {key: torch.zeros(0, 0, dtype=torch.long) for key in ("input_ids", "attention_mask", "labels")}
    indices = [index for index, *_ in samples]
    images = [image for _, _, image, _ in samples]
    if cfg.random_resized_crop and generator is not None:
        images = [random_resized_crop(im, cfg.random_resized_crop, generator) for im in images]
    dialogs = [dialog for *_, dialog in samples]
    check_dialogs(family, dialogs, cfg.system_prompt)
    batch = family.training_batch(processor, images, dialogs, system=cfg.system_prompt)
    lengths = batch["attention_mask"].sum(1)
    keep = lengths <= cfg.max_length
    if not keep.all():
        dropped = [i for i, k in zip(indices, keep.tolist()) if not k]
        warnings.warn(f"dropped sample(s) {dropped}: longer than data.max_length = {cfg.max_length} tokens "
                      f"({lengths.max().item()}); raise data.max_length to train on them")
        batch = select_rows(batch, keep, int(lengths[keep].max()) if keep.any() else 0)
    return batch


def select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Keep the rows where `keep`; cut the (right) padding of the token tensors to `length`."""
    n, seq = batch["input_ids"].shape
    out = {}
    for key, value in batch.items():
        value = value[keep] if value.shape[0] == n else value
        out[key] = value[:, :length] if value.dim() == 2 and value.shape[1] == seq else value
    return out
