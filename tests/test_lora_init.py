"""LoRA started from W (minivlm/lora_init.py): PiSSA, OLoRA and LoftQ against PEFT's own
initialisations on the same weights, and the properties each promises."""

from __future__ import annotations

import contextlib
import importlib.util

import bitsandbytes as bnb
import pytest
import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from peft.utils import loftq_utils
from transformers import AutoModelForImageTextToText

from conftest import tiny_config
from minivlm.build import build
from minivlm.load import float_weights
from minivlm.lora import adapters_off
from minivlm.lora_init import loftq, nf4_roundtrip, olora, pissa
from minivlm.quant import dequantized_weight

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@contextlib.contextmanager
def cuda_as_cpu(monkeypatch):
    """PEFT's loftq_init computes on "cuda" (or "xpu") whatever the weight's device: here, on the CPU."""
    to, params_to = torch.Tensor.to, bnb.nn.Params4bit.to

    def on_cpu(original):
        def moved(self, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return original(self, *args, **kwargs)
        return moved
    monkeypatch.setattr(torch.Tensor, "to", on_cpu(to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", on_cpu(params_to))
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda: None)
    # LoraConfig asks for scipy with init_lora_weights="loftq"; loftq_init itself does not use it.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: True if name == "scipy" else find_spec(name, *a))
    yield


def peft_init(path, init: str, r: int, alpha: float, monkeypatch):
    """PEFT's LoRA on the float model, A and B (and the frozen weight) set by init_lora_weights."""
    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    kwargs = dict(loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)) if init == "loftq" else {}
    with cuda_as_cpu(monkeypatch) if init == "loftq" else contextlib.nullcontext():
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                               init_lora_weights=init, **kwargs))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_init_equals_peft(init, quantized, tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """A₀, B₀ and the frozen weight W_res as PEFT's init_lora_weights makes them on the float model.

    Not bit for bit: PEFT decomposes in fp32, whose last bits LAPACK changes with its thread count
    (so PEFT is not deterministic here itself); ours in float64, rounded once (lora_init.padded).
    So: each singular (or QR) pair up to its sign, the decomposition's own freedom, to 1e-4 (LoftQ:
    see below);
    W_res to fp32 rounding; the float model's logits to 1e-5. On a 4-bit base ours holds W_res
    quantized, exactly (PEFT's own advice for PiSSA: "initialize under float ... re-quantize the
    residual model"); PEFT's W_res quantized may differ from it where one of its values sits on an
    NF4 code boundary. LoftQ: T = 1, alpha = r and no double quantization, where PEFT's (which
    leaves the scaling out, peft#1982; quantizes without double quantization) is the paper's; its
    Q(W) is then the same codes. T > 1 carries on any boundary value's flip, so it is checked by
    its own property below."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.lora.init, cfg.quant.load_in_4bit = init, quantized
    if init == "loftq":
        cfg.lora.alpha, cfg.quant.double_quant = cfg.lora.r, False
    built = build(cfg)
    theirs = peft_init(tiny_paligemma, init, cfg.lora.r, cfg.lora.alpha, monkeypatch)
    read = float_weights(built.family.MODEL_CLASS, str(tiny_paligemma), torch.float32)
    roundtrip = nf4_roundtrip("nf4", cfg.quant.double_quant, torch.float32)
    assert len(built.adapted) == 14
    for name in built.adapted:
        ours, peft = built.model.get_submodule(name), theirs.get_submodule(f"base_model.model.{name}")
        a, b = peft.lora_A["default"].weight, peft.lora_B["default"].weight
        w, frozen = read(name), peft.base_layer.weight
        if init == "loftq":
            # W − Q(W) is NF4's rounding noise: a flat spectrum, whose near-equal singular values
            # leave the vectors ill-conditioned (measured: σ₄ and σ₅ 1e-5 apart in one layer move
            # BA by 9e-4 between fp32 and fp64). What LoftQ promises is the error it leaves: the same.
            ba, their_ba = ours.scaling * ours.lora_B @ ours.lora_A, b @ a
            assert torch.linalg.norm(ba - their_ba) <= 2e-3 * torch.linalg.norm(their_ba), name
            q = roundtrip(w)
            torch.testing.assert_close(torch.linalg.norm(w - q - ba), torch.linalg.norm(w - q - their_ba),
                                       rtol=1e-5, atol=0)
        else:
            sign = torch.sign((ours.lora_A * a).sum(1))
            torch.testing.assert_close(ours.lora_A * sign[:, None], a, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.lora_B * sign, b, rtol=1e-4, atol=1e-5)
        residual = w if init == "loftq" else w - ours.scaling * ours.lora_B0 @ ours.lora_A0
        if init == "loftq":  # Q(W), the same codes
            torch.testing.assert_close(roundtrip(residual), frozen, rtol=0, atol=0)
        else:
            torch.testing.assert_close(residual, frozen, rtol=1e-5, atol=1e-6)
        kept = dequantized_weight(ours.base) if quantized else ours.base.weight
        torch.testing.assert_close(kept, roundtrip(residual) if quantized or init == "loftq" else residual,
                                   rtol=0, atol=0)
    if not quantized:
        batch = built.family.training_batch(built.processor, *sample())
        with torch.no_grad():
            torch.testing.assert_close(built.model.eval()(**batch).logits, theirs.eval()(**batch).logits,
                                       rtol=1e-5, atol=1e-5)


def sample():
    from PIL import Image
    images = [[Image.new("RGB", (32, 32), (200, 40, 40))], [Image.new("RGB", (40, 32), (40, 40, 200))]]
    return images, [[("what color is the shape", "red")], [("where is it", "top left")]]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_model_before_training_is_the_base(init, tiny_paligemma, shapes_data, tmp_path):
    """W_res + s·B₀A₀ = W: the float model computes what its checkpoint does, trained or not, and
    adapters_off() (DPO's and GRPO's reference) gives that model back after A and B have moved."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.quant.load_in_4bit = False
    plain = build(cfg).model.eval()
    cfg.lora.init = init
    built = build(cfg)
    model = built.model.eval()
    layer = model.get_submodule(built.adapted[0])
    assert not torch.allclose(layer.base.weight, plain.get_submodule(built.adapted[0]).base.weight, atol=1e-3)
    batch = built.family.training_batch(built.processor, *sample())
    with torch.no_grad():
        expected = plain(**batch).logits
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-4)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(model(**batch).logits, expected, atol=1e-3)
        with adapters_off(model):
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_pissa_takes_the_principal_directions():
    """s·B₀A₀ is the best rank-r approximation of W (Eckart-Young): its error is the rest of the spectrum."""
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    a, b = pissa(w, r=4, scaling=2.0)
    sv = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.norm(w - 2.0 * b @ a), sv[4:].norm(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-5, atol=1e-6)  # √S/s on both sides


def test_loftq_error_falls_with_iterations_and_beats_plain_qlora(tiny_paligemma, shapes_data, tmp_path):
    """‖W − (Q_T + s·B_TA_T)‖ on every decoder linear: below QLoRA's ‖W − Q(W)‖ (B = 0) after one
    alternation, and lower at each T of 1, 2, 5."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.quant.load_in_4bit = False
    built = build(cfg)
    roundtrip = nf4_roundtrip("nf4", True, torch.float32)
    for name in built.adapted:
        w = built.model.get_submodule(name).base.weight.float()
        errors = [torch.linalg.norm(w - roundtrip(w))]
        for t in (1, 2, 5):
            a, b, frozen = loftq(w, 4, 2.0, t, roundtrip)
            errors.append(torch.linalg.norm(w - roundtrip(frozen) - 2.0 * b @ a))
        assert errors[0] > errors[1] > errors[2] > errors[3], (name, errors)


def test_loftq_keeps_the_scaling_where_peft_does_not(tiny_paligemma, shapes_data, tmp_path):
    """With alpha ≠ r, s·B₀A₀ (ours) is the rank-r repair SVD_r(W − Q): the 4-bit layer at step 0
    is closer to W than its codes alone. PEFT's B₀A₀ is that repair, which its forward scales by s
    again: at s = 2 that lands exactly as far from W as no repair at all."""
    floats = tiny_config(tiny_paligemma, shapes_data, tmp_path)  # r 4, alpha 8: s = 2
    floats.quant.load_in_4bit = False
    plain = build(floats).model
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.lora.init = "loftq"
    built = build(cfg)
    for name in built.adapted:
        layer = built.model.get_submodule(name)
        assert layer.scaling == 2.0
        w, q = plain.get_submodule(name).base.weight, dequantized_weight(layer.base)
        ours, peft = q + layer.delta_weight(), q + 2 * layer.delta_weight()
        assert torch.linalg.norm(w - ours) < 0.95 * torch.linalg.norm(w - q), name
        # ‖E − 2·SVD_r(E)‖ = ‖E‖ (E = W − Q): at alpha = 2r PEFT's start is exactly QLoRA's
        # distance from W.
        torch.testing.assert_close(torch.linalg.norm(w - peft), torch.linalg.norm(w - q), rtol=1e-5, atol=0)


@pytest.mark.parametrize("init", [pissa, olora], ids=["pissa", "olora"])
def test_a_rank_above_the_weights_own_is_padded_with_zeros(init):
    """r = 12 on an 8 × 16 W: its 8 directions, then zero rows of A and zero columns of B; s·BA = W
    (PiSSA), BA = QR = W (OLoRA, whose s stays in the residual W − s·QR)."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    a, b = init(w, 12, 2.0)
    assert a.shape == (12, 16) and b.shape == (8, 12)
    assert not a[8:].any() and not b[:, 8:].any() and a[:8].abs().sum(1).min() > 0
    torch.testing.assert_close((1.0 if init is olora else 2.0) * b @ a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [pissa, olora], ids=["pissa", "olora"])
def test_the_start_is_the_same_bits_at_any_thread_count(init):
    """LAPACK's fp32 SVD and QR change in their last bits with the thread count (each torchrun rank
    runs one thread; a resumed run may have more), and W_res is quantized, where one bit can change
    a code. Computed in float64 and rounded once, the start is the same at 1 and 2 threads."""
    w = torch.randn(512, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    threads = torch.get_num_threads()
    try:
        starts = []
        for n in (1, 2):
            torch.set_num_threads(n)
            starts.append(init(w, 8, 2.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(*starts))
