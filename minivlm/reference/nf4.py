"""NF4 with double quantization in plain PyTorch: what bitsandbytes stores for each frozen 4-bit weight.

For reading and testing only: training quantizes with bitsandbytes (minivlm/quant.py), and
tests/test_reference.py proves this file equal to it, bit for bit.

QLoRA (Dettmers et al. 2023, §3) stores a frozen weight W as

    W (out, in) ── flatten, cut into blocks of 64 ──► c_b = absmax(block b)          eq. (1)
                                                        │
        W / c_b ∈ [-1, 1] ── nearest of 16 NF4 values ──► code 0..15 (4 bits)    NF4: eq. (4)
                                                        │ two codes per byte, the first in the high nibble
                                                        ▼
                                                    packed uint8, (n/2, 1)

    c (n/64 fp32 scales) ── minus their mean ── blocks of 256 ──► 8-bit codes + one fp32 absmax
                                                                  per 256 scales (double quantization)

and gives it back as   W ≈ NF4[code] · c_b,   c_b ≈ dynamic[c code] · absmax₂ + mean         eq. (6)

Bits per parameter: 4 + 8/64 + 32/(64·256) = 4.127, where one fp32 scale per 64 values would
cost 4 + 32/64 = 4.5 (the paper's 0.373 bits saved per parameter).

The 8-bit code book of the scales, `dynamic_map`, and `quantize_blockwise` are the 8-bit
optimizer's (Dettmers et al. 2022), which adam8bit.py uses for Adam's moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZE = 64  # values per absmax scale (QLoRA §3; bitsandbytes' default for 4 bits)
NESTED_BLOCKSIZE = 256  # scales per absmax of the double quantization
# The outermost probability of the NF4 code book, as bitsandbytes' create_normal_map sets it:
# ½[(1 − 1/30) + (1 − 1/32)], halfway between the centres of the last of 15 and of 16 equal-mass
# bins. Anything below 1 works; at p = 1 the quantile is +∞.
OFFSET = 0.9677083
LUT_SIZE = 65536  # bitsandbytes' CPU kernel looks 8-bit codes up on a grid of this many points


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, derived from the normal distribution's quantiles (QLoRA §3, eq. 4).

    Each value is the quantile Q(p) = Φ⁻¹(p) = √2·erfinv(2p − 1) of N(0, 1) at a probability p,
    the p evenly spaced, so that each code covers about the same share of normally distributed
    weights. To get an exact zero (padding, ReLU outputs, pruned weights stay 0), the paper builds
    the two halves apart: 2^(k−1)+1 = 9 quantiles for the positive half and 2^(k−1) = 8 for the
    negative half, each including p = ½ (zero), and keeps one zero: 8 positive, 7 negative, 0.
    Dividing by the largest makes the range [-1, 1], which absmax scaling maps the block onto.

    bitsandbytes generated its table (functional.get_4bit_type) with float32 at three places: the
    probabilities (torch.linspace in float32), the quantiles (scipy, float64, stored in a float32
    tensor) and the division. Doing exactly that reproduces the table bit for bit; the same
    arithmetic in float64 throughout, rounded to float32 once at the end, differs in 10 of the 16
    values, by up to 1.2e-7.
    """
    positive = torch.linspace(OFFSET, 0.5, 9)[:-1]  # 8 probabilities in (½, OFFSET]; p = ½ dropped
    negative = torch.linspace(OFFSET, 0.5, 8)[:-1]  # 7, mirrored below
    quantiles = torch.cat([
        torch.special.ndtri(positive.double()),     # Q(p), the inverse of the normal CDF Φ
        torch.zeros(1, dtype=torch.float64),        # the one exact zero
        -torch.special.ndtri(negative.double()),    # Q(1 − p) = −Q(p)
    ]).float().sort().values
    return quantiles / quantiles.max()              # normalise to [-1, 1]: eq. (4)'s q_i / max q


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 values of the 8-bit dynamic (tree) data type (Dettmers 2016; the 8-bit optimizers'
    "dynamic quantization", Dettmers et al. 2022), sorted, in [-1, 1] (or [0, 1] unsigned).

    Read a code's bits after the sign as: E zeros, then a 1 (the indicator), then fraction bits.
    The E zeros give the magnitude 10^−E, the fraction bits a linear value in [0.1, 1]:

        sign | 0 0 0 1 | f f f      →   ± 10^−3 · fraction(fff)

    Few leading zeros leave many fraction bits, so large values are finely resolved, while up to
    six zeros reach 1e-7: a wide range for Adam's moments, which span orders of magnitude.
    Without the sign bit (unsigned, for Adam's v ≥ 0) every level has one more fraction bit.
    """
    parts = []
    for fraction_bits in range(7):  # 7 bits after the sign; 6 − fraction_bits zeros before the indicator
        n = 2 ** (fraction_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, n + 1)  # n equal bins of [0.1, 1] ...
        fractions = (edges[:-1] + edges[1:]) / 2.0  # ... represented by their centres
        magnitude = 10 ** (fraction_bits - 6)
        parts += [magnitude * fractions] + ([-magnitude * fractions] if signed else [])
    return torch.cat([*parts, torch.tensor([0.0, 1.0])]).sort().values  # 254 levels, zero and one


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantization (Dettmers et al. 2022, "block-wise quantization"), as
    bitsandbytes' CPU kernel does it: (uint8 codes shaped like x, fp32 absmax per block).

    Each block of `blocksize` values is normalised by its own absmax, N_b = max|T_b|, and each
    value T_bi gets the code j whose value is nearest: argmin_j |code_j − T_bi / N_b|. One outlier
    then spoils only its own block's resolution.

    The CPU kernel finds "nearest" through a table: it rounds T_bi / N_b to one of 65536 evenly
    spaced points of [-1, 1] (a step of 2/65535 ≈ 3.1e-5) and takes that point's nearest code. So
    it cannot resolve the dynamic map's finest levels: a 0 in a block that is not all zeros comes
    back as 1.6e-5 (unsigned map) or 2.1e-5 (signed) times the block's absmax, not 0.
    bitsandbytes' CUDA kernel searches the code book itself (docs/qlora.md, the last section).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # zeros: absmax unchanged
    absmax = blocks.abs().amax(dim=1)                                  # N_b = max |T_b|
    nonzero = absmax > 0
    scaled = blocks * (1.0 / torch.where(nonzero, absmax, 1.0))[:, None]  # T_b / N_b ∈ [-1, 1]
    # The kernel's grid point: (v + 1)/2 · 65535, rounded half up (+ 0.5, then truncated). The
    # x86-64 build fuses the last multiply-add; for float32 inputs that never changes the point.
    point = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()
    codes = _grid_codes(code)[point]                                   # argmin_j |code_j − point's value|
    codes = torch.where(nonzero[:, None], codes, 0)                    # an all-zero block: code 0, absmax 0
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


def _grid_codes(code: torch.Tensor) -> torch.Tensor:
    """For each of the CPU kernel's 65536 grid points of [-1, 1], the index of the nearest code."""
    points = (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1) - 1.0
    midpoints = (code[:-1] + code[1:]) * 0.5
    # bucketize counts the midpoints below each point: a point on a midpoint takes the lower code.
    return torch.bucketize(points, midpoints)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """T_bi ≈ code[T^Q_bi] · N_b: the code's value times its block's absmax, fp32, shaped like `codes`."""
    values = code[codes.reshape(-1).long()]
    return (values * absmax.repeat_interleave(blocksize)[: values.numel()]).reshape(codes.shape)


@dataclass
class NF4Weight:
    """A weight as QLoRA stores it; the names follow bitsandbytes' Params4bit / QuantState."""

    packed: torch.Tensor   # uint8 (ceil(n/2), 1): two 4-bit codes per byte (Params4bit.data)
    absmax: torch.Tensor   # one scale per 64 values: fp32, or uint8 codes with double quantization
    offset: torch.Tensor | None         # fp32 scalar, the scales' mean (double quantization only)
    nested_absmax: torch.Tensor | None  # fp32, one per 256 scales (quant_state.state2.absmax)
    shape: torch.Size
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes stored for this weight (the code books are shared by all weights, not counted)."""
        parts = [self.packed, self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight to NF4 in blocks of 64, with its scales in 8 bits if `double_quant`."""
    nf4 = nf4_code_book()
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % BLOCKSIZE
    blocks = flat[:full].view(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)                                    # eq. (1): c = absmax(X) per block
    # bitsandbytes multiplies by 1/c in the full blocks and divides by c in a last, partial one;
    # the two can differ in the last bit, which can move a value sitting on a midpoint, so we do
    # the same. The clamp keeps an all-zero block at 0 (0 · 1e38) instead of 0/0.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    scaled = scaled.clamp(-1, 1)
    # An odd count gets one 0 to fill the last byte's low nibble (NF4's 0 is code 7).
    scaled = torch.nn.functional.pad(scaled, (0, n % 2))
    # Nearest NF4 value: count the midpoints below each value (on a midpoint: the lower code).
    codes = torch.bucketize(scaled, (nf4[:-1] + nf4[1:]) / 2).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2])[:, None]                 # first value in the high nibble
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, weight.shape, weight.dtype)
    # Double quantization (QLoRA §3): the scales are positive, so centring them on their mean
    # lets the signed 8-bit code book use both halves.
    offset = absmax.mean()
    absmax_codes, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(signed=True), NESTED_BLOCKSIZE)
    return NF4Weight(packed, absmax_codes, offset, nested_absmax, weight.shape, weight.dtype)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """W ≈ NF4[code] · c_b, shaped and typed as the weight was (eq. 6's doubleDequant)."""
    absmax = q.absmax
    if q.offset is not None:  # dequant(c₂, c₁) first: the scales back from their 8 bits
        absmax = dequantize_blockwise(q.absmax, q.nested_absmax, dynamic_map(signed=True), NESTED_BLOCKSIZE) + q.offset
    codes = torch.stack([q.packed[:, 0] >> 4, q.packed[:, 0] & 0xF], dim=1).reshape(-1)  # unpack both nibbles
    n = q.shape.numel()
    values = nf4_code_book()[codes[:n].long()]
    return (values * absmax.repeat_interleave(BLOCKSIZE)[:n]).reshape(q.shape).to(q.dtype)
