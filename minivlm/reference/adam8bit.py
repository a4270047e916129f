"""One step of 8-bit AdamW in plain PyTorch: what bitsandbytes' AdamW8bit does to a parameter.

For reading and testing only: training steps with bitsandbytes (minivlm/optim.py), and
tests/test_reference.py proves this file equal to it on the CPU, bit for bit.

Adam keeps two moments per trainable value, m (the gradient's running mean) and v (its square's),
in fp32: 8 bytes per value, four times a bf16 weight. The 8-bit optimizer (Dettmers et al. 2022)
stores each moment as uint8 codes plus one fp32 absmax per block of 256 values (2.03 bytes
for both), and every step goes

    m codes, absmax ─┐                                        ┌─► m codes, absmax
                     ├─ dequantize ─► m, v (fp32) ─ Adam ─ m', v' ─ quantize ─┤
    v codes, absmax ─┘                      │                 └─► v codes, absmax
                                            ▼
                              θ' = θ − lr · m̂ / (√v̂ + ε)   (fp32 math, 8-bit storage)

m is signed and uses the signed dynamic map; v ≥ 0 uses the unsigned one, which spends the sign
bit on precision. The quantization is nf4.py's `quantize_blockwise`, the same that double
quantization applies to NF4's scales.

bitsandbytes keeps tensors of fewer than 4096 values (its `min_8bit_size`) in 32-bit Adam instead,
since their state is too small to matter; this file is the 8-bit path only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minivlm.reference.nf4 import dequantize_blockwise, dynamic_map, quantize_blockwise

BLOCKSIZE = 256  # values per absmax of each moment (bitsandbytes' blockwise optimizers)


@dataclass
class AdamW8bitState:
    """One parameter's optimizer state; bitsandbytes' names in the comments (optimizer.state[p])."""

    step: int                # steps taken ("step")
    m_codes: torch.Tensor    # uint8, the parameter's shape ("state1")
    m_absmax: torch.Tensor   # fp32, one per block of 256 ("absmax1")
    v_codes: torch.Tensor    # ("state2")
    v_absmax: torch.Tensor   # ("absmax2")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.m_codes, self.m_absmax, self.v_codes, self.v_absmax))


def init_state(param: torch.Tensor) -> AdamW8bitState:
    """m = v = 0: every code 0 and every absmax 0 (a block with absmax 0 dequantizes to zeros)."""
    codes = torch.zeros_like(param, dtype=torch.uint8)
    absmax = torch.zeros(-(-param.numel() // BLOCKSIZE), dtype=torch.float32, device=param.device)
    return AdamW8bitState(0, codes, absmax, codes.clone(), absmax.clone())


@torch.no_grad()
def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, state: AdamW8bitState, lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """Update `param` (fp32) and `state` in place by one AdamW step with gradient `grad`.

    The equations are Adam's (Kingma & Ba 2015, Algorithm 1) with decoupled weight decay
    (Loshchilov & Hutter 2019, Algorithm 2, line 12); each line is written with the torch calls
    bitsandbytes' CPU kernel uses, so that its float rounding is the same: `add_(x, alpha=a)` and
    `addcmul_`/`addcdiv_` are single fused operations, not a multiply followed by an add.
    """
    beta1, beta2 = betas
    signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
    state.step += 1
    t = state.step
    # Dequantize: T = code[T^Q] · N_b (8-bit optimizers, block-wise quantization).
    m = dequantize_blockwise(state.m_codes, state.m_absmax, signed, BLOCKSIZE)
    v = dequantize_blockwise(state.v_codes, state.v_absmax, unsigned, BLOCKSIZE)
    g = grad.float()

    m.mul_(beta1).add_(g, alpha=1.0 - beta1)              # m_t = β1 m_{t−1} + (1 − β1) g_t
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)       # v_t = β2 v_{t−1} + (1 − β2) g_t²
    correction1 = 1.0 - beta1 ** t                       # m̂_t = m_t / (1 − β1^t)
    correction2 = math.sqrt(1.0 - beta2 ** t)             # √v̂_t = √v_t / √(1 − β2^t)
    denominator = (v.sqrt() / correction2).add_(eps)      # √v̂_t + ε
    if weight_decay > 0.0:
        param.mul_(1.0 - lr * weight_decay)               # θ ← θ − lr·λ·θ  (decoupled: not through m, v)
    param.addcdiv_(m, denominator, value=-lr / correction1)  # θ_t = θ − lr · m̂_t / (√v̂_t + ε)

    # Requantize, each block by its new absmax: argmin_j |code_j − T_bi / N_b|.
    state.m_codes, state.m_absmax = quantize_blockwise(m, signed, BLOCKSIZE)
    state.v_codes, state.v_absmax = quantize_blockwise(v, unsigned, BLOCKSIZE)
