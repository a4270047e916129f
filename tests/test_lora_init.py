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
from minivlm.lora import adapters_off
from minivlm.lora_init import loftq, nf4_roundtrip, pissa
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
    kwargs = dict(loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)) if init == "loftq" else {}
    with cuda_as_cpu(monkeypatch) if init == "loftq" else contextlib.nullcontext():
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                               init_lora_weights=init, **kwargs))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_init_equals_peft(init, quantized, tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """A₀, B₀ and the frozen weight as PEFT's init_lora_weights makes them on the float model. On a
    4-bit base ours holds that frozen weight quantized: PEFT's own advice for PiSSA ("initialize
    under float ... re-quantize the residual model"), and what its LoftQ base is saved for. LoftQ
    with alpha = r, where PEFT's init (which leaves the scaling out, peft#1982) is the paper's,
    and without double quantization, as PEFT's loftq_init quantizes."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.lora.init, cfg.lora.loftq_iterations, cfg.quant.load_in_4bit = init, 2, quantized
    if init == "loftq":
        cfg.lora.alpha, cfg.quant.double_quant = cfg.lora.r, False
    built = build(cfg)
    theirs = peft_init(tiny_paligemma, init, cfg.lora.r, cfg.lora.alpha, monkeypatch)
    roundtrip = nf4_roundtrip("nf4", cfg.quant.double_quant, torch.float32)
    assert len(built.adapted) == 14
    for name in built.adapted:
        ours, peft = built.model.get_submodule(name), theirs.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(ours.lora_A, peft.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.lora_B, peft.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        frozen = peft.base_layer.weight
        if quantized:  # our 4-bit codes are their frozen float weight's
            torch.testing.assert_close(dequantized_weight(ours.base), roundtrip(frozen), rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(ours.base.weight, frozen, rtol=1e-5, atol=1e-6)
    if not quantized:
        batch = built.family.training_batch(built.processor, *sample(), )
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
        # ‖E − 2·SVD_r(E)‖ = ‖E‖ (E = W − Q): at alpha = 2r PEFT's start is exactly QLoRA's distance from W.
        torch.testing.assert_close(torch.linalg.norm(w - peft), torch.linalg.norm(w - q), rtol=1e-5, atol=0)
