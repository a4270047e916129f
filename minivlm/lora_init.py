"""Where LoRA starts: A and B taken from W itself (PiSSA, OLoRA, LoftQ) instead of B = 0.

Plain LoRA starts at ΔW = s·BA = 0 with A random: the first steps spend themselves finding
directions. These three start A and B on directions of W, and move the same s·B₀A₀ out of the
frozen weight, so the model at step 0 still computes W:

    W  =  W_res  +  s·B₀A₀          W_res is what the layer keeps frozen (4-bit under QLoRA)

  PiSSA (Meng et al. 2024, eq. 2-4): the r principal singular directions. W = U S Vᵀ, then
        B₀ = U_r √(S_r/s),  A₀ = √(S_r/s) V_rᵀ,  W_res = W − s·B₀A₀ = U_[r:] S_[r:] V_[r:]ᵀ.
        Training moves the largest components of W; the frozen rest has smaller values, so
        NF4's blocks (scaled by their largest |value|) lose less of it: QPiSSA.
  OLoRA (Büyükakyüz 2024): a QR of W, Q orthonormal. B₀ = Q[:, :r], A₀ = R[:r], W_res = W − s·B₀A₀.
  LoftQ (Li et al. 2023, Algorithm 1): for QLoRA alone. Alternate T times
        Q_t     = quantize(W − s·B_{t-1}A_{t-1})            (B₀A₀ = 0: Q_1 is plain QLoRA's)
        s·B_tA_t = SVD_r(W − Q_t)                           the best rank-r repair of Q_t
    and keep W_res = Q_T: then Q_T + s·B_TA_T is closer to W than QLoRA's Q(W) + 0.

Each needs the float W, not its 4-bit codes: on a 4-bit base build.py hands in the checkpoint's
weights, read again one layer at a time (load.float_weights); W_res is then quantized in place of
the layer's Q(W). What that means for a user's base: the frozen weights are no longer the
checkpoint's. The adapter alone does not turn the checkpoint into the fine-tune: export.py writes
PEFT's conversion for that (a rank-2r adapter, s·(BA − B₀A₀), on the original W); the merged
export needs none. B₀ and A₀ stay with the layer (LoRALinear.lora_A0/lora_B0, not saved: the same
W gives them again) for that conversion and for adapters_off(), whose model is W_res + s·B₀A₀.

PEFT's LoftQ (peft#1982) ignores s and sets BA = SVD_r(W − Q): with alpha ≠ r its model at step
0 is Q + s·SVD_r, not Q + SVD_r. Here s·BA = SVD_r as for PiSSA; with alpha = r the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes as bnb
import torch
from torch import nn

from minivlm.lora import LoRALinear
from minivlm.quant import quantize_into

def pissa(w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) with s·B₀A₀ = the rank-r truncated SVD of w (out, in)."""
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)  # float64: see `padded`
    root = torch.sqrt(sv[:r] / scaling)  # √(S_r/s) on both sides: s·B₀A₀ = U_r S_r V_rᵀ
    return padded(root[:, None] * vh[:r], u[:, :r] * root, r)


def olora(w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) = (R[:r], Q[:, :r]) of w = QR, as PEFT's olora_init (which leaves s in the residual)."""
    q, rr = torch.linalg.qr(w.double())
    return padded(rr[:r], q[:, :r], r)


def padded(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A₀ and B₀ at rank r, in fp32. W (out, in) has only min(out, in) directions, so beyond them A's
    rows and B's columns are 0; such a pair stays 0 in training (each one's gradient is the other's
    multiple). Computed in float64 and rounded: LAPACK's fp32 result depends on its thread count in
    the last bits, and W_res is quantized, where one bit can change a code. Ranks of a torchrun job
    (one thread each), a resumed run and an export must all make the same start from the same W."""
    k = a.shape[0]
    a, b = nn.functional.pad(a, (0, 0, 0, r - k)), nn.functional.pad(b, (0, r - k))
    return a.float().contiguous(), b.float().contiguous()


def loftq(w: torch.Tensor, r: int, scaling: float, iterations: int,
          roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_T, B_T, the float W that quantizes to Q_T); `roundtrip(x)` = dequantize(quantize(x))."""
    frozen = w
    for t in range(1, iterations + 1):
        q = roundtrip(frozen)  # Q_t
        a, b = pissa(w - q, r, scaling)  # s·B_tA_t = SVD_r(W − Q_t)
        if t < iterations:  # the last Q_t is the one kept: the next pass would quantize another W
            frozen = w - scaling * b @ a
    return a, b, frozen


def nf4_roundtrip(quant_type: str, double_quant: bool, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> dequantize(quantize(x)) as a Linear4bit of these settings stores x, in fp32."""
    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        codes, state = bnb.functional.quantize_4bit(x.to(dtype), blocksize=64, compress_statistics=double_quant,
                                                    quant_type=quant_type)
        return bnb.functional.dequantize_4bit(codes, state).float()
    return roundtrip


@torch.no_grad()
def initialize(model: nn.Module, init: str, read_weight: Callable[[str], torch.Tensor], iterations: int = 1,
               quant_type: str = "nf4", double_quant: bool = True) -> None:
    """Start every LoRALinear of `model` at `init` from its float W, `read_weight(layer name)`.

    The frozen weight becomes W_res, quantized again with the layer's own settings where the
    layer is 4-bit. LoftQ on a float base quantizes with `quant_type`/`double_quant` and keeps
    Q_T dequantized: the base a user saves to load in 4-bit later, as PEFT's LoftQ writes it.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        base = layer.base
        four_bit = isinstance(base, bnb.nn.Linear4bit)
        dtype = base.compute_dtype if four_bit else base.weight.dtype
        w = read_weight(name).to(layer.lora_A.device, torch.float32)
        if init == "loftq":
            settings = ((base.weight.quant_type, base.weight.compress_statistics) if four_bit
                        else (quant_type, double_quant))
            roundtrip = nf4_roundtrip(*settings, dtype)
            a, b, frozen = loftq(w, layer.r, layer.scaling, iterations, roundtrip)
            frozen = frozen if four_bit else roundtrip(frozen)
        else:
            a, b = (pissa if init == "pissa" else olora)(w, layer.r, layer.scaling)
            frozen = w - layer.scaling * b @ a
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        layer.lora_A0, layer.lora_B0 = a.clone(), b.clone()
        if four_bit:
            quantize_into(base, frozen.to(dtype), base.weight.device)
        else:
            base.weight.copy_(frozen.to(dtype))
