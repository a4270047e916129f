"""Calling the model in the configured precision: autocast, and inputs on the right device/dtype."""

from __future__ import annotations

import contextlib

import torch

from minivlm.build import DTYPES, Built
from minivlm.config import Config


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast: matmuls (adapters included) run in half precision, while the fp32
    adapter weights stay the ones the optimizer updates. Neither flag: plain fp32."""
    if cfg.train.bf16 or cfg.train.fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.bf16 else torch.float16)
    return contextlib.nullcontext()


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Everything but labels, on the device; images in the dtype the vision tower was loaded in."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None)
            for k, v in batch.items() if k != "labels"}


def logits_of(cfg: Config, built: Built, batch: dict[str, torch.Tensor], at: torch.Tensor | None = None,
              model: torch.nn.Module | None = None) -> torch.Tensor:
    """The model's logits for `batch`: (batch, seq, vocab), or with `at`, a (batch, seq) bool mask,
    only at those positions, flattened to (n, vocab). transformers' `logits_to_keep` applies the
    lm_head to the selected hidden states only, so the other positions never cost a vocab-sized row.
    `model`: the module to call, if not built.model (its DistributedDataParallel wrapper in training)."""
    # No KV cache: nothing here generates, and a cache also hides packed rows (packing.py) from transformers.
    extra = {"use_cache": False, **({} if at is None else {"logits_to_keep": at.to(built.device)})}
    with autocast(cfg, built.device):
        return (model or built.model)(**model_inputs(batch, built.device, DTYPES[cfg.model.dtype]), **extra).logits
