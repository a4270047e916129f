"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch import nn

from minivlm.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (the frozen base has no optimizer state at all).

    "paged_adamw_8bit" (the QLoRA default) keeps Adam's two moments in 8 bits, block-wise
    quantized (Dettmers et al. 2022), in paged memory that spills to CPU RAM under GPU
    memory pressure instead of failing. On the CPU there is nothing to page from: the same
    8-bit AdamW runs, not paged, and one line says so.

    LoRA+ (Hayou et al. 2024, train.lora_plus_ratio = λ): in a LoRA layer of large width, A and B
    at one learning rate cannot both learn efficiently; B at λ·lr can (their Theorem 1, λ ≈ 16
    in their runs). Every B gets its own parameter group whose `lr_scale` λ the loop multiplies
    into the scheduled lr (loop.optimizer_step). PEFT's create_loraplus_optimizer also puts every
    1-D trainable (biases and norms of modules trained in full) in B's group; here they stay at lr.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.lora_plus_ratio:
        params = [{"params": [p for n, p in named if not n.endswith(".lora_B")], "lr_scale": 1.0},
                  {"params": [p for n, p in named if n.endswith(".lora_B")], "lr_scale": cfg.lora_plus_ratio}]
    else:
        params = [{"params": [p for _, p in named], "lr_scale": 1.0}]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    paged = cfg.optimizer == "paged_adamw_8bit" and named[0][1].is_cuda
    if cfg.optimizer == "paged_adamw_8bit" and not paged:
        print("optimizer: paged_adamw_8bit pages only on CUDA; using the same 8-bit AdamW, not paged, on the CPU")
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(params, **kwargs)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant.

    A pure function of the step, so resuming needs nothing but the step. Warmup step s gets
    lr·(s+1)/(W+1): the first step already learns. transformers' schedules give lr·s/W, so their
    first step runs at lr 0 and does nothing; after warmup both are the same curve.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr
