"""Quantization scope: what is 4-bit, what carries LoRA, what trains, asserted on a real PaliGemma."""

from __future__ import annotations

import bitsandbytes as bnb
from PIL import Image
import torch
from torch import nn

from conftest import tiny_config
from minivlm.build import build
from minivlm.lora import LoRALinear
from minivlm.quant import dequantize, quantize_linears


def test_paligemma_scope(tiny_paligemma, shapes_data, tmp_path):
    built = build(tiny_config(tiny_paligemma, shapes_data, tmp_path))
    model = built.model
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    projections = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in
                   ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    # Every language-model projection is 4-bit and wrapped; nothing else is either.
    assert lora == projections
    assert four_bit == {f"{n}.base" for n in projections}
    assert set(built.adapted) == projections and len(built.quantized) == len(projections)
    # The vision tower, projector, embeddings and lm_head stay float and frozen.
    for name in ["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens", "lm_head"]:
        module = model.get_submodule(name)
        assert not any(isinstance(m, (bnb.nn.Linear4bit, LoRALinear)) for m in module.modules()), name
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters()), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in projections for ab in "AB"}
    assert built.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Quantized layers use NF4 with double quant and the configured compute dtype.
    layer = model.get_submodule(next(iter(four_bit)))
    assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics
    assert layer.weight.quant_state.nested and layer.compute_dtype == torch.float32


def test_4bit_layers_compute_in_the_model_dtype(tiny_paligemma, shapes_data, tmp_path):
    """model.dtype = bfloat16: each 4-bit weight is dequantized to bf16 for its matmul, as the
    float layers around it compute (an fp32 compute dtype would upcast every activation)."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.model.dtype = "bfloat16"
    model = build(cfg).model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert layers[0](torch.randn(2, layers[0].in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_quantize_keeps_multihead_attention_float():
    # SigLIP's pooling head uses nn.MultiheadAttention, whose out_proj subclasses nn.Linear.
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(64, 4, batch_first=True), "fc": nn.Linear(64, 64)})
    names = quantize_linears(model, skip=[], compute_dtype=torch.float32, device=torch.device("cpu"))
    assert names == ["fc"]
    x = torch.randn(2, 5, 64)
    model["mha"](x, x, x)  # still runs


def test_nf4_roundtrip_error_is_bitsandbytes_own_and_dequantize_is_exact():
    """The quantized layer holds what bitsandbytes' own quantize_4bit makes of the weight (NF4,
    blocks of 64, double quant), so its rounding error is bitsandbytes' to the bit; that error is
    NF4's, below FP4's on the same weight. dequantize() gives the float layer the kernel computes."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(256, 128))
    w = holder[0].weight.detach().clone()
    quantize_linears(holder, skip=[], compute_dtype=torch.float32, device=torch.device("cpu"))
    q = holder[0]
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 256 * 128 // 2  # two codes a byte
    deq = dequantize(q)
    F = bnb.functional
    codes, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.weight.data, codes)
    assert torch.equal(deq.weight, F.dequantize_4bit(codes, state))
    rel = ((deq.weight - w).norm() / w.norm()).item()
    fp4 = F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, quant_type="fp4"))
    assert rel < ((fp4 - w).norm() / w.norm()).item()
    x = torch.randn(4, 256)
    torch.testing.assert_close(deq(x), q(x), rtol=1e-5, atol=1e-5)


def test_train_eval_train_on_4bit(tiny_paligemma, shapes_data, tmp_path):
    """Evaluating in the middle of training must not break the next training step (CPU repack trap)."""
    built = build(tiny_config(tiny_paligemma, shapes_data, tmp_path))
    model = built.model
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    batch = built.family.training_batch(built.processor, [[Image.new("RGB", (32, 32))]],
                                        [[("what shape is it", "circle")]])
    labels = batch.pop("labels")
    for mode in ("train", "eval", "train"):
        model.train(mode == "train")
        if mode == "eval":
            with torch.no_grad():
                model(**batch)
        else:
            model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
