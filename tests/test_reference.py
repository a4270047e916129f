"""minivlm/reference against the bitsandbytes that training uses, on this CPU: equal bit for bit.

NF4 with double quantization against bnb.functional.quantize_4bit / dequantize_4bit (and the
bytes build() put in a model), the 8-bit block-wise quantization against quantize_blockwise,
and the 8-bit AdamW step against bnb.optim.AdamW8bit, over several steps.
"""

from __future__ import annotations

import copy
import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.utils import CODE as BNB_CPU_TABLES

from conftest import tiny_config
from minivlm.build import build
from minivlm.reference import adam8bit, nf4
from walkthrough import float_weight


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Weight-like values: normal (std 0.02), a heavy-tailed column of outliers, an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[5::97] *= 40  # outliers, as LLM weights have, which absmax scaling must survive
    flat[64:128] = 0  # a block of exact zeros (pruned): absmax 0
    return w.to(dtype)


# ---------------------------------------------------------------- code books


def test_nf4_code_book_is_bitsandbytes_table_derived_from_normal_quantiles():
    derived = nf4.nf4_code_book()
    assert torch.equal(derived, F.get_4bit_type("nf4", device="cpu"))  # what quantize_4bit returns as code
    assert torch.equal(derived, BNB_CPU_TABLES["nf4"])  # what the CPU kernels look codes up in
    # NF4's shape: 7 negative values, an exact zero, 8 positive, from -1 to 1.
    assert (derived[:7] < 0).all() and derived[7] == 0 and (derived[8:] > 0).all()
    assert derived[0] == -1 and derived[-1] == 1
    # The same construction in float64 throughout differs by at most 2^-23 (10 of 16 values differ).
    p_pos = torch.linspace(nf4.OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(nf4.OFFSET, 0.5, 8, dtype=torch.float64)[:-1]
    ideal = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(p_neg)])
    ideal = ideal.sort().values / ideal.max()
    assert (derived.double() - ideal).abs().max() <= 2 ** -23
    # ndtri is the normal quantile function: Q(p) = √2·erfinv(2p − 1).
    torch.testing.assert_close(math.sqrt(2) * torch.erfinv(2 * p_pos - 1), torch.special.ndtri(p_pos), rtol=1e-12, atol=0)
    # Equal probability mass: Φ at the positive levels (un-normalised) steps evenly from ½ to OFFSET.
    phi = torch.special.ndtr(derived[7:].double() * torch.special.ndtri(torch.tensor(nf4.OFFSET, dtype=torch.float64)))
    steps = phi.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (nf4.OFFSET - 0.5) / 8), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = nf4.dynamic_map(signed)
    assert torch.equal(ours, F.create_dynamic_map(signed=signed))
    assert ours.numel() == 256 and (ours.diff() >= 0).all() and ours[-1] == 1
    assert ours.abs()[ours != 0].min() < 1e-6  # the dynamic range reaches 1e-7


# ---------------------------------------------------------------- 8-bit block-wise quantization


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_equals_bitsandbytes(signed):
    g = torch.Generator().manual_seed(1)
    n = 256 * 40 + 77  # a partial last block
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))  # values over many decades
    x = x if signed else x.abs()
    x[256:512] = 0  # an all-zero block
    x[600:610] = 0  # zeros in a block that is not
    code = nf4.dynamic_map(signed)
    codes, absmax = nf4.quantize_blockwise(x, code, 256)
    bnb_codes, state = F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, state.absmax)
    back = nf4.dequantize_blockwise(codes, absmax, code, 256)
    assert torch.equal(back, F.dequantize_blockwise(bnb_codes, state))
    # The CPU kernel's 65536-point grid: a 0 next to non-zero values comes back as the code nearest
    # to 1/65535 of the range above 0, not as 0 (the nearest code, which CUDA's search returns).
    zero_point = torch.tensor(2 * 32768 / 65535 - 1, dtype=torch.float32)  # where the grid puts 0: 1.5e-5
    nearest_to_it = code[(code - zero_point).abs().argmin()]
    assert back[605] == nearest_to_it * absmax[2] != 0
    assert back[300] == 0  # an all-zero block stays zero


def test_grid_point_is_the_same_with_a_fused_multiply_add():
    """The x86-64 build computes (v+1)/2·65535 + 0.5 with one rounding (an FMA); nf4.py rounds twice.
    Near every one of the 65535 boundaries between grid points the two give the same point."""
    k = torch.arange(1, nf4.LUT_SIZE, dtype=torch.float64)
    boundary = ((k - 0.5) / (nf4.LUT_SIZE - 1) * 2 - 1).float()
    near, up, down = [boundary], boundary, boundary
    for _ in range(4):  # four float32 steps to either side
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    v = torch.cat(near).clamp(-1, 1)
    u = (v + 1.0) * 0.5
    twice = (u * (nf4.LUT_SIZE - 1) + 0.5).long()
    fused = (u.double() * (nf4.LUT_SIZE - 1) + 0.5).float().long()  # exact product and sum, rounded once
    assert torch.equal(twice, fused)


# ---------------------------------------------------------------- NF4 with double quantization


def assert_nf4_equal(w: torch.Tensor, double_quant: bool) -> None:
    ours = nf4.quantize_nf4(w, double_quant=double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(nf4.dynamic_map(signed=True), state.state2.code)
    dequantized = nf4.dequantize_nf4(ours)
    assert dequantized.dtype == w.dtype and dequantized.shape == w.shape
    # (bitsandbytes' CPU kernel hands an even-length 1-D weight back as (1, n): compare values)
    assert torch.equal(dequantized, F.dequantize_4bit(packed, state).reshape(w.shape))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 128), (512, 128), (128, 512), (300, 257), (5, 100), (7, 33), (1, 1000), (129,)])
def test_nf4_equals_bitsandbytes(shape, dtype, double_quant):
    """Block-aligned shapes, and shapes whose last block is partial or whose count is odd."""
    assert_nf4_equal(weights(shape, dtype), double_quant)


def test_nf4_scales_full_blocks_by_the_reciprocal_and_a_partial_block_by_division():
    """x·(1/a) and x/a can differ in the last bit; for this pair one lands on the midpoint between
    NF4's two lowest values and the other just above it, so the code depends on which is used."""
    a, x = 0.39411088824272156, -0.3342440128326416  # float32 values; x / a is that midpoint exactly
    assert x * (1 / torch.tensor(a)) != torch.tensor(x) / a
    full_block = torch.tensor([a, x] + [0.0] * 62)  # 64 values: one full block, multiplied by 1/absmax
    partial_block = torch.tensor([a, x] + [0.0] * 30)  # 32 values: one partial block, divided by absmax
    codes = []
    for w in (full_block, partial_block):
        assert_nf4_equal(w, double_quant=False)
        codes.append(int(nf4.quantize_nf4(w, double_quant=False).packed[0, 0]) & 15)  # x's code: low nibble
    assert codes == [1, 0]


def test_nf4_equals_the_bytes_build_put_in_the_model(tiny_paligemma, shapes_data, tmp_path):
    """Real weights through the project's own path: the streamed loader's quantize_into."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    built = build(cfg)
    assert built.quantized
    for name in built.quantized:
        layer = built.model.get_submodule(name)
        layer = getattr(layer, "base", layer)  # LoRALinear wraps the targeted ones
        ours = nf4.quantize_nf4(float_weight(cfg, built, name))
        state = layer.weight.quant_state
        assert torch.equal(ours.packed, layer.weight.data), name
        assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.offset, state.offset), name
        assert torch.equal(ours.nested_absmax, state.state2.absmax), name
        assert torch.equal(nf4.dequantize_nf4(ours), F.dequantize_4bit(layer.weight.data, state)), name


@pytest.mark.parametrize("shape", [(3, 80), (2, 96)])
def test_bnb_cpu_dequantize_reads_rows_not_blocks_when_rows_are_not_block_multiples(shape):
    """Rows of a multiple of 16 values but not of 64: bitsandbytes' AVX-512 CPU kernel takes each
    row's scales as if every row started a block, though blocks run over the flattened tensor. Our
    dequantization equals bitsandbytes' on the flattened tensor, and on the 2-D one either equals
    it (no AVX-512) or differs exactly as that row-wise indexing predicts."""
    w = weights(shape, torch.float32)
    ours = nf4.quantize_nf4(w)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([w.numel()])
    dequantized = nf4.dequantize_nf4(ours)
    assert torch.equal(dequantized.reshape(-1), F.dequantize_4bit(packed, flat_state).reshape(-1))  # bnb: (1, n)
    # What the row-wise indexing computes: row r, column c uses scale r·(cols // 64) + c // 64.
    rows, cols = shape
    scales = nf4.dequantize_blockwise(ours.absmax, ours.nested_absmax, nf4.dynamic_map(), 256) + ours.offset
    index = torch.arange(rows)[:, None] * (cols // 64) + torch.arange(cols)[None, :] // 64
    codes = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], 1).reshape(shape).long()
    row_wise = nf4.nf4_code_book()[codes] * scales[index]
    bnb_2d = F.dequantize_4bit(packed, state)
    assert not torch.equal(row_wise, dequantized)  # the two readings differ for these shapes ...
    assert torch.equal(bnb_2d, dequantized) or torch.equal(bnb_2d, row_wise)  # ... and bnb gives one of them


# ---------------------------------------------------------------- 8-bit AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape", [(64, 80), (72, 65)])
def test_adamw8bit_steps_equal_bitsandbytes(shape, weight_decay):
    """Six steps, a learning rate that changes per step (as the schedule does), gradients over many
    decades with some exact zeros: parameters and both 8-bit states equal after every step."""
    g = torch.Generator().manual_seed(2)
    param = torch.randn(shape, generator=g)
    ours = param.clone()
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    state = adam8bit.init_state(ours)
    for step in range(6):
        grad = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
        grad.view(-1)[step * 100:step * 100 + 50] = 0
        lr = 3e-3 * (step + 1) / 7
        param.grad = grad.clone()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
        adam8bit.adamw8bit_step(ours, grad, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        bnb_state = optimizer.state[param]
        assert bnb_state["state1"].dtype == torch.uint8 and bnb_state["step"] == state.step == step + 1
        assert torch.equal(ours, param), step
        assert torch.equal(state.m_codes, bnb_state["state1"]) and torch.equal(state.m_absmax, bnb_state["absmax1"]), step
        assert torch.equal(state.v_codes, bnb_state["state2"]) and torch.equal(state.v_absmax, bnb_state["absmax2"]), step
    assert state.nbytes() == 2 * param.numel() + 2 * 4 * math.ceil(param.numel() / 256)


def test_adamw8bit_keeps_small_tensors_in_32_bit():
    """bitsandbytes' min_8bit_size: a LoRA A of rank 8 over 128 inputs (1024 values) gets fp32 Adam."""
    small, large = torch.nn.Parameter(torch.randn(8, 128)), torch.nn.Parameter(torch.randn(512, 8))
    optimizer = bnb.optim.AdamW8bit([small, large])
    small.grad, large.grad = torch.randn_like(small), torch.randn_like(large)
    optimizer.step()
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert optimizer.state[large]["state1"].dtype == torch.uint8
