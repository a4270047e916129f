"""LoRA: a low-rank trainable update beside a frozen (possibly 4-bit) linear layer.

                 x  (…, in)
                 │
      ┌──────────┴───────────┐
      │                      │ dropout(x)
      │                      ▼
      │                ┌───────────┐
      │                │  A  (r×in)│  Kaiming-uniform init, fp32, trainable
      │                └─────┬─────┘
      ▼                      ▼ (…, r)
 ┌──────────┐          ┌───────────┐
 │  W  base │          │  B (out×r)│  zero init, fp32, trainable
 │  frozen  │          └─────┬─────┘
 │ NF4 or fp│                │ × alpha / r
 └────┬─────┘                │
      ▼                      ▼
      y  =  W x      +     (alpha/r) · B A dropout(x)

Hu et al. 2021 (LoRA), eq. 3: h = W0 x + ΔW x = W0 x + B A x. QLoRA (Dettmers et al. 2023)
keeps W0 in 4-bit NF4 and A, B in higher precision: gradients flow through the dequantized
W0 to reach earlier adapters, but only A and B are ever updated.

B = 0 at init, so the adapted model starts out exactly equal to the base model. The alpha/r
scale keeps the update's size roughly independent of r, so the learning rate need not be
retuned when r changes.

rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor", Theorem 3.2): with alpha/r
the update's scale falls as 1/r, so a large r learns slower and gains nothing over a small
one; scaling by γ_r = alpha/√r instead keeps the adapter's activations and gradients of order
1 as r grows (`rslora=True`, lora.use_rslora). Only the constant changes: the same A, B, merge.
LoRA+ (Hayou et al. 2024) changes the optimizer, not the layer: optim.build_optimizer.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator

import bitsandbytes as bnb
import torch
from torch import nn

from minivlm.modules import matches, replace_module
from minivlm.quant import dequantize, dequantized_weight


class SharedDropout(nn.Module):
    """Dropout that draws one mask per input tensor, reused by every adapter reading that tensor.

    In a decoder layer q_proj, k_proj and v_proj are called on the very same tensor, and so are
    gate_proj and up_proj. With a dropout each, every one of them draws its own mask: 7 masks per
    layer where 4 distinct inputs exist. Sharing gives each adapter the same expected update
    (each still sees x with a fraction p dropped and the rest scaled by 1/(1-p)); what changes is
    that q, k and v see the same noise. Only the last input is remembered (a weak reference, so a
    freed tensor whose id is reused can never match). Under activation checkpointing the
    recomputed forward restores the RNG state and draws the same masks again.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self._last = None  # do not keep a training activation alive through evaluation
            return x
        if self._last is not None and self._last[0]() is x:
            return self._last[1]
        out = nn.functional.dropout(x, self.p, training=True)
        self._last = (weakref.ref(x), out)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, one mask per input tensor"


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · alpha/r, with `base` frozen (nn.Linear or bnb Linear4bit).

    `dropout` is a probability (the layer's own nn.Dropout) or a dropout module shared with other
    layers (SharedDropout)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float | nn.Module = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA's γ_r, or LoRA's
        device = base.weight.device
        # Adapters stay fp32 whatever the base computes in: the optimizer updates fp32 values, and
        # autocast casts them down for the matmul only (the "master weights" of mixed precision).
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        # Same init as nn.Linear (and PEFT) for A; B = 0 makes ΔW = BA = 0 at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if isinstance(dropout, nn.Module):
            self.dropout = dropout
        else:  # dropout 0 costs nothing: no mask drawn, no copy of x
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Where A and B started when lora_init took them from W (PiSSA, OLoRA, LoftQ): the frozen
        # weight is then W − s·B₀A₀, and the model before training is W_res + s·B₀A₀. Not saved.
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.merged = False
        self.enabled = True  # False inside adapters_off(): the layer as it was before training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled and self.lora_A0 is None:
            return y
        a, b, h = (self.lora_A, self.lora_B, self.dropout(x)) if self.enabled else (self.lora_A0, self.lora_B0, x)
        if not torch.is_autocast_enabled(h.device.type):
            # Without autocast the matmul needs x in A's fp32. Under autocast it casts both to the
            # compute dtype itself: an fp32 copy of x here would only be cast back (same values).
            h = h.to(a.dtype)
        delta = nn.functional.linear(nn.functional.linear(h, a), b)  # (…, out)
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A (scaling = alpha/r, or alpha/√r with rsLoRA), shape (out, in), fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight, so forward costs one matmul.

        A 4-bit base is first replaced by its dequantized float copy: NF4 cannot hold W + ΔW
        without a second rounding, so we never requantize behind the user's back.
        """
        if self.merged:
            return
        if isinstance(self.base, bnb.nn.Linear4bit):
            self.base = dequantize(self.base)
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again (the base stays float if merge() dequantized it)."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """The frozen W (out, in) as forward computes with it: a 4-bit one dequantized (one layer's worth)."""
        return dequantized_weight(self.base) if isinstance(self.base, bnb.nn.Linear4bit) else self.base.weight

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA on the direction of W,
    and a trained magnitude per output feature.

        W' = m · (W + s·BA) / ‖W + s·BA‖_c          eq. 5; ‖·‖_c: the norm of each output row,
                                                      m (out,) trained, initialised to ‖W‖_c
        y  = W'x + bias
           = base(x) + (m/‖·‖_c − 1) · Wx + (m/‖·‖_c) · s·BAx

    The norm is detached (§4.3: "treating ‖V + ∆V‖_c as a constant"): it moves with B and A, no
    gradient flows through it, and backward keeps nothing of it but one (out,) vector. It needs W
    itself: a 4-bit W is dequantized for it, one layer at a time, and freed before the next layer.
    With B = 0 at init, m/‖W‖_c = 1: the model starts as its base, as with LoRA.

    Wx is base(x) less its bias: no second matmul, and a 4-bit base keeps only its codes for
    backward. In training with dropout the adapter reads dropout(x), and so must Wx (PEFT's
    DoraLinearVariant.forward): then base(dropout(x)) is computed once more.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float | nn.Module = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=base.weight.device))
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W + s·BA‖_c: the adapted layer computes what it did without DoRA (B = 0: the base)."""
        self.lora_magnitude.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖_c, (out,), fp32, outside autograd."""
        return torch.linalg.norm(self.base_weight().float() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        h = self.dropout(x) if dropped else x
        base_h = self.base(h) if dropped else y  # W·h (+ bias, taken off below)
        if self.base.bias is not None:
            base_h = base_h - self.base.bias
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)
        lora = nn.functional.linear(nn.functional.linear(h, self.lora_A), self.lora_B)  # (…, out)
        scale = self.lora_magnitude / self.weight_norm()  # (out,): m / ‖W + s·BA‖_c
        return y + ((scale - 1) * base_h + scale * lora * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← m/‖W + s·BA‖_c · (W + s·BA); the norm is kept, unmerge needs it and W no longer holds it."""
        if self.merged:
            return
        self._merged_norm = self.weight_norm()
        super().merge()  # W + s·BA (a 4-bit base dequantized first)
        w = self.base.weight
        w.copy_(((self.lora_magnitude / self._merged_norm)[:, None] * w.float()).to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() * (self._merged_norm / self.lora_magnitude)[:, None]).to(w.dtype))
        super().unmerge()


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every LoRALinear of `model` computes base(x) alone: `model` is its base model
    again, bit for bit, without a second copy of it in memory. DPO's reference model (objectives/dpo.py).
    A layer started from W (lora_init: PiSSA, OLoRA, LoftQ) computes W_res x + s·B₀A₀x: its model
    before training.

    Only adapters are switched off: modules trained in full (lora.train_modules) have no frozen
    original to fall back to. A merged adapter is part of its base weight and cannot be switched
    off, so a merged model is refused.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in layers):
        raise ValueError("adapters_off: the model's adapters are merged into its weights; unmerge them first")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def inject_lora(
    model: nn.Module,
    targets: list[str],
    skip: list[str],
    r: int,
    alpha: float,
    dropout: float,
    train_modules: list[str] = (),
    shared_dropout: bool = False,
    rslora: bool = False,
    dora: bool = False,
    vision: str | None = None,
) -> list[str]:
    """Freeze `model`, wrap every targeted linear in a LoRALinear, in place; return the wrapped names.

    Empty `targets` wraps nothing: only `train_modules` train (LLaVA's projector-only stage 1).

    A module is targeted when its name matches a `targets` pattern (suffix) and no `skip`
    pattern (anywhere). Modules named in `train_modules` are unfrozen and trained in full (in
    fp32). With `shared_dropout`, all adapters share one SharedDropout (one mask per input
    tensor). `rslora` scales every adapter by alpha/√r; `dora` makes each a DoRALinear. `vision`
    (lora.vision: the family's VISION_BLOCKS) adapts every linear inside that module too, skip or
    not: the tower stays in its own precision, its adapters beside it. Raises ValueError if a
    target hits nothing or hits a module that is not linear.
    """
    model.requires_grad_(False)
    chosen = []
    for name, module in model.named_modules():
        targeted = any(matches(name, p, anywhere=False) for p in targets)
        skipped = any(matches(name, s, anywhere=True) for s in skip)
        # type(), not isinstance: an nn.MultiheadAttention's out_proj is read as a raw weight (quant.py).
        if vision and matches(name, vision, anywhere=True) and type(module) in (nn.Linear, bnb.nn.Linear4bit):
            chosen.append(name)
        elif targeted and not skipped:
            if not isinstance(module, (nn.Linear, bnb.nn.Linear4bit)):
                raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; "
                                 "narrow lora.targets (e.g. 'self_attn.q_proj') or add it to lora.skip")
            chosen.append(name)
    if targets and not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))]
        raise ValueError(f"lora.targets {targets} match no linear layer outside lora.skip {skip}; "
                         f"linear layers look like: {linears[:6]}")
    if shared_dropout and dropout > 0:
        dropout = SharedDropout(dropout)
    layer = DoRALinear if dora else LoRALinear
    for name in chosen:
        replace_module(model, name, layer(model.get_submodule(name), r, alpha, dropout, rslora))
    for pattern in train_modules:
        hits = [m for n, m in model.named_modules() if matches(n, pattern, anywhere=False)]
        if not hits:
            raise ValueError(f"lora.train_modules entry {pattern!r} matches no module")
        for module in hits:
            if any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()):
                raise ValueError(f"lora.train_modules entry {pattern!r} holds 4-bit layers, which cannot be "
                                 "trained; add it to quant.skip")
            module.float().requires_grad_(True)  # full fine-tuning wants fp32 master weights
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: lora.targets and lora.train_modules are both empty")
    return chosen


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fine-tune adds to its base: every parameter that requires grad (A, B, DoRA's m, train_modules)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain linears back in their place (for export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            replace_module(model, name, module.base)
    return model


def logical_numel(p: torch.Tensor) -> int:
    """Values a parameter holds: a 4-bit weight counts as its logical in×out, not its packed bytes."""
    return p.quant_state.shape.numel() if isinstance(p, bnb.nn.Params4bit) and p.quant_state is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted logically."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
