"""The memory planner (minivlm/plan.py) against real built models: weights, adapters and optimizer
state to the byte, saved activations within 15%, and --dry-run without reading a weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import save_paligemma, saved_for_backward
from minivlm.build import build
from minivlm.config import from_dict, load_config
from minivlm.objectives.sft import answer_loss_sum
from minivlm.optim import build_optimizer
from minivlm.plan import parse_size, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def config(model_dir: Path, family: str, r: int = 4, **train):
    return from_dict({
        "model": {"family": family, "name_or_path": str(model_dir), "dtype": "float32"},
        "lora": {"r": r, "alpha": 8, "dropout": 0.0},
        "data": {"max_length": 64},
        "train": {"batch_size": 2, "optimizer": "adamw_8bit", "device": "cpu", **train},
    })


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, and of each 4-bit weight's quantization state; shared
    storage (tied embeddings) once."""
    seen: dict[int, int] = {}

    def add(t):
        if t is not None:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            add(qs.absmax), add(qs.code)
            if qs.nested:
                add(qs.offset), add(qs.state2.absmax), add(qs.state2.code)
    return sum(seen.values())


@pytest.fixture(scope="module")
def small_paligemma(tmp_path_factory) -> Path:
    """6 layers, hidden 256: LoRA A of r 16 has 4096 values, so bnb's 8-bit optimizer path runs too."""
    return save_paligemma(tmp_path_factory.mktemp("small-paligemma"), hidden=256, layers=6)


@pytest.mark.parametrize("model,dora", [("tiny_paligemma", False), ("small_paligemma", False), ("small_paligemma", True),
                                        ("tiny_idefics2", False), ("tiny_llava_phi2", False)])
def test_planned_weights_adapters_and_optimizer_equal_the_built_model(model, dora, request):
    family = {"tiny_idefics2": "idefics2", "tiny_llava_phi2": "llava_phi2"}.get(model, "paligemma")
    cfg = config(request.getfixturevalue(model), family, r=16)
    cfg.lora.use_dora = dora
    if family == "llava_phi2":
        cfg.lora.train_modules = ["projector"]
    plan = plan_memory(cfg)
    built = build(cfg)
    assert (plan.quantized, plan.adapted) == (len(built.quantized), len(built.adapted))
    assert plan.lora_params + plan.full_params == built.trainable_params
    # No bnb padding shows up at these shapes: the planned bytes are exact.
    assert plan.weights + plan.trainable_bytes == resident_bytes(built.model)
    optimizer = build_optimizer(built.model, cfg.train)
    for p in built.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {v.data_ptr(): v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
             if torch.is_tensor(v) and k.startswith(("state", "absmax"))}
    assert plan.optim_bytes == sum(state.values())
    assert plan.grad_bytes == 4 * built.trainable_params


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_planned_activations_match_what_autograd_saves(dora, small_paligemma):
    """Bytes of the tensors kept for backward in one training forward (counted by a saved-tensors
    hook, parameters excluded, shared storage once) against the plan's no-checkpointing term."""
    cfg = config(small_paligemma, "paligemma")
    cfg.lora.use_dora = dora
    built = build(cfg)
    built.model.train()
    images = [[Image.new("RGB", (32, 32), (60 * i, 100, 200))] for i in range(2)]
    batch = built.family.training_batch(built.processor, images, [[("what shape is it", "a red circle")]] * 2)
    cfg.data.max_length = batch["input_ids"].shape[1]
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum()) / 2
    saved = saved_for_backward(built.model, lambda: answer_loss_sum(cfg, built, batch).backward())
    planned = plan_memory(cfg, answer_tokens=answer_tokens).act_saved
    assert abs(planned - saved) < 0.15 * saved, (planned, saved)


def counted_by_hand(config_json: Path, r: int) -> dict[str, int]:
    """PaliGemma's bytes in bf16 with NF4 + double quantization, LoRA of rank r on the decoder's seven
    projections and 8-bit AdamW, from the shapes in config.json (SigLIP without its head, Gemma
    with a tied lm_head), written out without minivlm.plan."""
    import json
    c = json.loads(config_json.read_text())
    t, v = c["text_config"], c["vision_config"]
    h, i, layers, heads, kv = (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                               t["num_attention_heads"], t["num_key_value_heads"])
    head_dim = t.get("head_dim", 256)  # Gemma's default
    # (out, in) of q, k, v, o, gate, up, down
    linears = [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim), (i, h), (i, h),
               (h, i)] * layers
    assert sum(o * n for o, n in linears) == 1_981_808_640

    def nf4(n: int) -> int:  # codes, 16-entry code book; uint8 absmax per 64, fp32 absmax per 256 of those,
        blocks = n // 64  # the 256-entry code book of the absmax and their offset
        return n // 2 + 64 + blocks + 4 * -(-blocks // 256) + 1024 + 4

    vh, vi, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    vision = (v["num_hidden_layers"] * (4 * vh + 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh))
              + 3 * patch * patch * vh + vh + (224 // patch) ** 2 * vh + 2 * vh)
    floats = vision + (vh * h + h) + c["vocab_size"] * h + (2 * layers + 1) * h  # + projector, embeddings, norms
    lora = [(r * n, o * r) for o, n in linears]  # A (r × in), B (out × r)
    sizes = [size for pair in lora for size in pair]
    optimizer = sum(8 * n if n < 4096 else 2 * n + 8 * -(-n // 256) for n in sizes)
    return {"4-bit": sum(nf4(o * n) for o, n in linears), "float": 2 * floats, "adapters": 4 * sum(sizes),
            "gradients": 4 * sum(sizes), "optimizer": optimizer}


def test_dry_run_of_a_seed_config_reads_no_weights(monkeypatch, capsys):
    import safetensors.torch
    from transformers import PreTrainedModel

    from minivlm.cli import train

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run read weights")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    result = train.main(["--config", str(ROOT / "configs/paligemma.toml"), "--set",
                         f"model.name_or_path={ROOT / 'configs/real/paligemma-3b-pt-224'}",
                         "--dry-run", "--gpu-memory", "24GiB"])
    out = capsys.readouterr().out
    assert "1,981,808,640 params" in out  # the 126 decoder linears of the real 3B PaliGemma
    assert "total" in out and "fits, " in out
    # The total is the sum of the terms, each counted here from config.json by hand.
    expected = counted_by_hand(ROOT / "configs/real/paligemma-3b-pt-224/config.json", r=8)
    cfg = load_config(str(ROOT / "configs/paligemma.toml"),
                      [f"model.name_or_path={ROOT / 'configs/real/paligemma-3b-pt-224'}"])
    plan = plan_memory(cfg)
    activations = max(plan.act_ckpt, plan.vision_transient)  # checked against autograd above
    assert plan.quant_bytes == expected["4-bit"] and plan.trainable_bytes == expected["adapters"]
    assert plan.grad_bytes == expected["gradients"] and plan.optim_bytes == expected["optimizer"]
    # The buffers are not counted here: SigLIP's 256 int64 position ids and Gemma's rotary
    # frequencies, 3,074 bytes in all.
    assert 0 <= plan.float_bytes - expected["float"] < 4096
    assert result["total_bytes"] == plan.quant_bytes + plan.float_bytes + sum(
        expected[k] for k in ("adapters", "gradients", "optimizer")) + activations + 2**29  # + the CUDA context
    train.main(["--config", str(ROOT / "configs/paligemma.toml"), "--set",
                f"model.name_or_path={ROOT / 'configs/real/paligemma-3b-pt-224'}",
                "--set", "train.gradient_checkpointing=false", "--dry-run", "--gpu-memory", "4GiB"])
    assert "does not fit: needs" in capsys.readouterr().out


def test_every_recipe_of_a_hub_model_plans_from_its_copy_in_configs_real(monkeypatch, tmp_path):
    """Each seed recipe whose model.name_or_path is not here plans at once from configs/real/<the id's
    last part>, the hub never asked (an empty Hugging Face cache; the probe refuses to run)."""
    import minivlm.build
    from huggingface_hub import constants

    from minivlm.build import is_hub_id
    from minivlm.plan import format_plan

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(minivlm.build, "hub_offline_reason", lambda: pytest.fail("the hub was asked"))
    planned = []
    for recipe in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(recipe, [])
        if cfg.model.name_or_path.startswith("base/tiny-"):  # the demos' bases, which `make base` builds
            continue
        plan = plan_memory(cfg)
        copy = f"configs/real/{cfg.model.name_or_path.rpartition('/')[2]}/"  # shown from here, if under it
        if is_hub_id(cfg.model.name_or_path):  # base/llava-phi2 too, until python -m minivlm.models.llava_phi2 writes it
            assert f"{copy}, a copy of {cfg.model.name_or_path}'s config (no download)" in format_plan(plan)
        planned.append(recipe.name)
    # The 14 families' recipes, LLaVA-Phi's stage 1, GRPO on Qwen2.5-VL and DPO on SmolVLM. (IDEFICS's
    # failed once: its LLaMA has no num_key_value_heads.)
    assert len(planned) == 17, planned


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24GB") == parse_size("24G") == 24 * 2**30
    assert parse_size("512MiB") == 2**29
