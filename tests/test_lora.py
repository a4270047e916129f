"""Properties of LoRALinear and the injector: the math of LoRA, checked, not printed; and on a 4-bit
base, equal to PEFT's over transformers' 4-bit model."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from conftest import tiny_config
from tiny import ARCHITECTURES
from minivlm.build import build
from minivlm.batches import collate
from minivlm.data import load_split
from minivlm.objectives.sft import answer_loss_sum, answer_tokens
from minivlm.lora import (DoRALinear, LoRALinear, SharedDropout, count_parameters, inject_lora, merge_lora,
                          trainable_state_dict)
from minivlm.modules import matches
from minivlm.quant import dequantize, quantize_linears


def float_linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(64, 32, bias=bias)


def nf4_linear(seed: int = 0) -> bnb.nn.Linear4bit:
    holder = nn.Sequential(float_linear(seed))
    quantize_linears(holder, skip=[], compute_dtype=torch.float32, device=torch.device("cpu"))
    return holder[0]


BASES = {"float": float_linear, "nf4": nf4_linear}


def randomize_b(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()


LAYERS = {"lora": LoRALinear, "dora": DoRALinear}


def randomize(layer: LoRALinear) -> None:
    """B random, and DoRA's magnitude off its init: every part of the layer shows in its output."""
    randomize_b(layer)
    if isinstance(layer, DoRALinear):
        with torch.no_grad():
            layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))


@pytest.mark.parametrize("layer_class", LAYERS.values(), ids=LAYERS)
@pytest.mark.parametrize("kind", BASES)
def test_zero_init_b_leaves_output_unchanged(kind, layer_class):
    base = BASES[kind]()
    x = torch.randn(5, 64)
    expected = base(x)
    layer = layer_class(base, r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    torch.testing.assert_close(layer(x), expected, rtol=0 if layer_class is LoRALinear else 1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", BASES)
def test_dora_is_magnitude_times_the_normalised_adapted_weight(kind):
    """DoRA's eq. 5, W' = m · (W + s·BA) / ‖W + s·BA‖_c, written out on the dequantized weight; the
    norm is a constant to autograd (§4.3): m's gradient is (ŷ-direction · upstream), nothing more."""
    layer = DoRALinear(BASES[kind](), r=4, alpha=8)
    randomize(layer)
    w = layer.base_weight().float()
    assert torch.equal(w, dequantize(layer.base).weight) if kind == "nf4" else w is layer.base.weight
    direction = w + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    norm = direction.norm(dim=1)
    x = torch.randn(5, 64)
    expected = x @ (layer.lora_magnitude.detach()[:, None] * direction / norm[:, None]).T + layer.base.bias
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(layer.lora_magnitude.grad, (x @ (direction / norm[:, None]).T).sum(0),
                               rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_r():
    base = float_linear()
    layer = LoRALinear(base, r=4, alpha=12)
    assert layer.scaling == 3.0
    with torch.no_grad():
        layer.lora_A.fill_(0.5)
        layer.lora_B.fill_(0.25)
    x = torch.randn(3, 64)
    # B A x with constant A, B: every output gets r * 0.25 * 0.5 * sum(x), times alpha/r.
    delta = (12 / 4) * 4 * 0.25 * 0.5 * x.sum(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x) - base(x), delta.expand(3, 32), rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r_and_merges_the_same():
    """rsLoRA: γ_r = alpha/√r (Kalajdzievski 2023), in the forward and in the merged weight."""
    base = float_linear()
    layer = LoRALinear(base, r=4, alpha=12, rslora=True)
    assert layer.scaling == 6.0  # 12 / √4, where alpha/r would be 3
    randomize_b(layer)
    x = torch.randn(3, 64)
    expected = base(x) + 6.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_class", LAYERS.values(), ids=LAYERS)
@pytest.mark.parametrize("kind", BASES)
def test_merge_equals_unmerged_and_unmerge_restores(kind, layer_class):
    layer = layer_class(BASES[kind](), r=4, alpha=8)
    randomize(layer)
    x = torch.randn(7, 64)
    unmerged = layer(x)
    before = layer.base_weight().float().clone()
    layer.merge()
    assert layer.merged and type(layer.base) is nn.Linear  # a 4-bit base became a float Linear
    assert not torch.allclose(layer.base.weight, before, atol=1e-3)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()  # idempotent: a second unmerge must not subtract ΔW twice
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_lora_returns_plain_linears_with_same_outputs():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_linears(model, skip=[], compute_dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, targets=["0", "2"], skip=[], r=4, alpha=4, dropout=0.0)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            randomize_b(m)
    x = torch.randn(4, 64)
    expected = model(x)
    merge_lora(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_applies_in_train_mode_only():
    layer = LoRALinear(float_linear(), r=4, alpha=8, dropout=0.5)
    randomize_b(layer)
    x = torch.randn(8, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    no_dropout = layer.base(x) + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), no_dropout, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), no_dropout, atol=1e-3)


@pytest.mark.parametrize("shared", [False, True])
def test_shared_dropout_draws_one_mask_per_input_tensor(shared):
    """q/k/v read the same tensor: with shared dropout their adapters see the same mask, and a new
    tensor (even with equal values) gets a new one."""
    model = nn.ModuleDict({n: float_linear() for n in ("q", "k", "v")})
    inject_lora(model, targets=["q", "k", "v"], skip=[], r=4, alpha=8, dropout=0.5, shared_dropout=shared)
    with torch.no_grad():  # identical adapters, so different deltas can only come from different masks
        for layer in model.values():
            layer.lora_A.copy_(model["q"].lora_A)
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    assert (model["q"].dropout is model["k"].dropout) == shared
    x = torch.randn(16, 64)

    def delta(name, inp):
        return model[name](inp) - model[name].base(inp)

    dq, dk, dv = delta("q", x), delta("k", x), delta("v", x)
    assert torch.equal(dq, dk) == shared and torch.equal(dq, dv) == shared
    assert not torch.equal(delta("q", x.clone()), dq)  # a new input tensor draws a new mask
    # Dropout's expectation is unchanged: inverted scaling, a fraction p of inputs zeroed.
    h = SharedDropout(0.5).train()(torch.ones(100_000))
    assert abs((h == 0).float().mean().item() - 0.5) < 0.01 and set(h.unique().tolist()) == {0.0, 2.0}
    model.eval()  # no mask at all: each adapter adds s·B·A·x
    for name, layer in model.items():
        torch.testing.assert_close(delta(name, x), layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T))


def test_autocast_adapter_without_the_fp32_copy_computes_the_same_bits():
    """Under bf16 autocast the adapter's input is no longer copied to fp32 first (autocast casts
    it straight back to bf16 for the matmul): the output must be bit-identical to the copying code."""
    layer = LoRALinear(float_linear(), r=4, alpha=8)
    randomize_b(layer)
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with_copy = layer.base(x) + (nn.functional.linear(nn.functional.linear(x.float(), layer.lora_A), layer.lora_B)
                                     * layer.scaling).to(y.dtype)
    assert y.dtype == torch.bfloat16 and torch.equal(y, with_copy)


@pytest.mark.parametrize("kind", BASES)
def test_only_adapters_get_gradients_and_4bit_base_stays_frozen(kind):
    model = nn.Sequential(BASES[kind](), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, targets=["0"], skip=[], r=4, alpha=8, dropout=0.0)
    packed_before = model[0].base.weight.data.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: B moves in the first, then A gets a non-zero gradient too
        model(torch.randn(6, 64)).pow(2).sum().backward()
        opt.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"0.lora_A", "0.lora_B"}
    assert set(trainable_state_dict(model)) == {"0.lora_A", "0.lora_B"}
    assert torch.equal(model[0].base.weight.data, packed_before)
    assert model[0].lora_A.dtype == torch.float32


def test_train_modules_are_trained_in_full_fp32():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    inject_lora(model, targets=["0"], skip=[], r=2, alpha=2, dropout=0.0, train_modules=["1"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "1.weight", "1.bias"}
    assert model[1].weight.dtype == torch.float32


def test_count_parameters_counts_4bit_weights_logically():
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    quantize_linears(model, skip=[], compute_dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, targets=["0"], skip=[], r=4, alpha=8, dropout=0.0)
    trainable, total = count_parameters(model)
    assert trainable == 4 * 64 + 32 * 4
    assert total == 64 * 32 + trainable


def test_name_matching():
    assert matches("language_model.layers.0.self_attn.q_proj", "q_proj", anywhere=False)
    assert matches("language_model.layers.0.self_attn.q_proj", "self_attn.q_proj", anywhere=False)
    assert not matches("language_model.layers.0.self_attn.q_proj_extra", "q_proj", anywhere=False)
    assert matches("model.vision_tower.encoder.layers.0.fc1", "vision_tower", anywhere=True)
    assert not matches("model.vision_towers.fc1", "vision_tower", anywhere=True)
    assert matches("layers.3.mlp.up_proj", r"re:layers\.[0-3]\.mlp\..*", anywhere=False)
    assert not matches("layers.13.mlp.up_proj", r"re:layers\.[0-3]\.mlp\..*", anywhere=False)


def test_injector_errors_name_the_problem():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_lora(model, targets=["q_proj"], skip=[], r=2, alpha=2, dropout=0.0)
    with pytest.raises(ValueError, match="not a linear layer"):
        inject_lora(model, targets=["1"], skip=[], r=2, alpha=2, dropout=0.0)


# Each variant as its LoraConfig keys; our config keys have PEFT's names.
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "dora-dropout": {"use_dora": True, "lora_dropout": 0.1}}


def peft_name(name: str) -> str:
    """Our trainable's name as it is in a PeftModel (adapter "default")."""
    module, attr = name.rsplit(".", 1)
    attr = {"lora_magnitude": "lora_magnitude_vector"}.get(attr, attr)
    return f"base_model.model.{module}.{attr}.default.weight"


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_equal_peft_on_a_transformers_model(variant, quantized, tiny_paligemma, shapes_data, tmp_path):
    """The path users run today as the oracle: transformers loads the base (in 4-bit with
    BitsAndBytesConfig: NF4, double quant, the same modules skipped) and PEFT wraps its linears.
    With the same adapter values: the same base weights, logits, loss, gradient of every trainable
    tensor (A, B, DoRA's magnitude), and merged weights; with each variant's flag set as PEFT's."""
    options = VARIANTS[variant]
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.quant.load_in_4bit = quantized
    cfg.lora.dropout = options.get("lora_dropout", 0.0)
    cfg.lora.use_rslora, cfg.lora.use_dora = options.get("use_rslora", False), options.get("use_dora", False)
    built = build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # A and B both random: every gradient is non-zero; m off its init too
        for n, p in built.model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * 0.1
                p.mul_(1 + noise) if n.endswith("lora_magnitude") else p.copy_(noise)
    skip = [f"model.{m}" if m != "lm_head" else m for m in built.family.QUANT_SKIP]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    base = AutoModelForImageTextToText.from_pretrained(tiny_paligemma, dtype=torch.float32, device_map="cpu",
                                                       quantization_config=quantization if quantized else None)
    peft_model = get_peft_model(base, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, **{"lora_dropout": 0.0, **options},
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    theirs = dict(peft_model.named_parameters())
    ours = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    assert len(ours) == sum(1 for n in theirs if ".lora_" in n) == 14 * (3 if cfg.lora.use_dora else 2)
    for name, p in ours.items():
        with torch.no_grad():
            theirs[peft_name(name)].copy_(p)
    for name in built.adapted:  # the decoder's 14 projections, each under its adapter
        assert torch.equal(built.model.get_submodule(f"{name}.base").weight.data,
                           peft_model.get_submodule(f"base_model.model.{name}.base_layer").weight.data)

    batch = collate(load_split(cfg.data, "train"), [0, 1, 2], cfg.data, built.family, built.processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    built.model.train(), peft_model.train()
    torch.manual_seed(1)  # with dropout: the same masks, drawn in the same order
    loss = answer_loss_sum(cfg, built, batch) / answer_tokens(batch)
    loss.backward()
    torch.manual_seed(1)
    logits = peft_model(**inputs).logits
    reference = F.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, p in ours.items():
        g = theirs[peft_name(name)].grad
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.manual_seed(1)
        torch.testing.assert_close(built.model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)

    merged, their_merged = merge_lora(built.model), peft_model.merge_and_unload()
    for name in built.adapted:
        mine, other = merged.get_submodule(name), their_merged.get_submodule(name)
        if quantized:  # PEFT quantizes the merged weight again; ours stays float (LoRALinear.merge)
            holder = nn.Sequential(mine)
            quantize_linears(holder, [], torch.float32, torch.device("cpu"))
            mine, other = dequantize(holder[0]), dequantize(other)
        torch.testing.assert_close(mine.weight, other.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2", *ARCHITECTURES])
def test_lora_vision_adapts_every_linear_of_the_tower_blocks_and_nothing_else(family, request, tmp_path):
    """lora.vision: every linear inside the family's VISION_BLOCKS (attention and MLP) gets an adapter
    over its float weight; outside the tower only the decoder's targets, none of the projector's."""
    path = request.getfixturevalue(f"tiny_{family}")
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family)
    cfg.lora.vision = True
    built = build(cfg)
    blocks = built.family.VISION_BLOCKS
    tower = {n: m for n, m in built.model.named_modules() if matches(n, blocks, anywhere=True)}
    adapted = {n for n, m in tower.items() if isinstance(m, LoRALinear)}
    assert not [n for n, m in tower.items() if type(m) is nn.Linear and not n.endswith(".base")]
    assert all(type(tower[n].base) is nn.Linear for n in adapted)  # in the tower's own precision
    kinds = {n.rsplit(".", 1)[-1] for n in adapted}
    assert kinds & {"q_proj", "qkv"} and kinds & {"fc1", "fc2", "up_proj", "linear_fc1"}, kinds
    outside = set(built.adapted) - adapted
    assert outside and all(any(matches(n, t, anywhere=False) for t in built.family.LORA_TARGETS) for n in outside)
    assert not any(matches(n, s, anywhere=True) for n in outside for s in built.family.LORA_SKIP)
