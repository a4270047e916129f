"""The frozen reference policy π_ref of DPO and GRPO, at no cost in memory.

Without train.init_from, π_ref is the base model: the same model with its adapters switched off
(lora.adapters_off). With train.init_from (an SFT adapter, the usual SFT -> DPO or SFT -> GRPO
pipeline), training starts from that adapter and π_ref *is* that adapter, frozen: its tensors
(the adapter's size, not the model's) are read once and copied into the trainable parameters for
each reference forward, the trained values back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from minivlm import distributed
from minivlm.checkpoint import read_adapter
from minivlm.config import Config, ConfigError
from minivlm.lora import adapters_off


def reference_weights(cfg: Config, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """What π_ref's trainable tensors hold: None for the base model (adapters off), else the
    train.init_from adapter, which must hold every trainable tensor of the model."""
    if not cfg.train.init_from:
        return None
    try:
        saved = read_adapter(cfg.train.init_from, device=next(model.parameters()).device)
    except FileNotFoundError:
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r} holds no adapter; give a checkpoint "
                          "directory a run wrote (e.g. runs/demo/last)") from None
    # Names as checkpoints write them, whether or not FSDP has wrapped the model (distributed.py).
    trainable = {distributed.unwrapped_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(saved))
    if missing:
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r} lacks {len(missing)} of this model's trainable "
                          f"tensors (e.g. {missing[:2]}), and DPO and GRPO use that adapter as their reference model: train "
                          "with the [lora] config it was trained with")
    return {n: saved[n].to(p.dtype) for n, p in trainable.items()}


@contextlib.contextmanager
def reference(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[nn.Module]:
    """Inside the block, `model` computes π_ref: without gradient, in eval mode, and with its
    adapters off (weights None) or its trainable tensors holding `weights` (see reference_weights)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if weights is None:
                with adapters_off(model):
                    yield model
            else:
                params = {distributed.unwrapped_name(n): p for n, p in model.named_parameters()}
                trained = {n: params[n].clone() for n in weights}
                for n, w in weights.items():
                    params[n].copy_(w)
                try:
                    yield model
                finally:
                    for n, w in trained.items():
                        params[n].copy_(w)
    finally:
        model.train(was_training)
