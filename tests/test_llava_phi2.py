"""LLaVA-style Phi + CLIP (seed 001): assembly from two checkpoints, multi-turn labels, scope,
projector-only stage 1, stage 2 from stage 1's projector with validation loss, then inference."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minivlm.cli import infer
from minivlm.cli import train
from conftest import ROOT, tiny_config
from minivlm.build import build
from minivlm.lora import LoRALinear
from minivlm.models import llava_phi2


def test_assembled_model_keeps_both_checkpoints(tiny_llava_phi2):
    spec = json.loads((tiny_llava_phi2 / "llava_phi2.json").read_text())
    model = llava_phi2.LlavaPhi.from_pretrained(tiny_llava_phi2)
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    phi = AutoModelForCausalLM.from_pretrained(spec["language_model"])
    clip = CLIPVisionModel.from_pretrained(spec["vision_model"])
    assert model.language_model.lm_head.bias is not None  # Phi's lm_head bias survives assembly
    for a, b in zip(model.language_model.state_dict().values(), phi.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(model.vision_tower.state_dict().values(), clip.state_dict().values()):
        assert torch.equal(a, b)
    # The saved projector is the one reloaded.
    again = llava_phi2.LlavaPhi.from_pretrained(tiny_llava_phi2)
    assert torch.equal(again.projector[0].weight, model.projector[0].weight)


def test_multi_turn_labels_cover_every_answer(tiny_llava_phi2):
    processor = llava_phi2.load_processor(tiny_llava_phi2)
    tok = processor.tokenizer
    dialogs = [[("what color is the shape", "red"), ("where is it", "top left")], [("what shape is it", "circle")]]
    batch = llava_phi2.training_batch(processor, [[Image.new("RGB", (40, 30))], [Image.new("RGB", (30, 60))]], dialogs)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for row, dialog in enumerate(dialogs):
        labels = batch["labels"][row]
        expected = sum((tok(a, add_special_tokens=False)["input_ids"] + [eos] for _, a in dialog), [])
        assert labels[labels != -100].tolist() == expected
    image_id = tok.convert_tokens_to_ids("<image>")
    n_patches = (32 // 8) ** 2
    assert ((batch["input_ids"] == image_id).sum(1) == n_patches).all()
    assert (batch["labels"][batch["input_ids"] == image_id] == -100).all()


def test_scope_phi_4bit_with_lora_clip_and_projector_float(tiny_llava_phi2, tmp_path):
    cfg = tiny_config(tiny_llava_phi2, tmp_path, tmp_path / "run", family="llava_phi2")
    cfg.lora.train_modules = ["projector"]
    model = build(cfg).model
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"language_model.model.layers.{i}.{p}" for i in range(2)
                       for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                                 "mlp.fc1", "mlp.fc2"]}
    assert {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == {f"{n}.base" for n in wrapped}
    assert type(model.language_model.lm_head) is torch.nn.Linear
    assert not any(isinstance(m, (bnb.nn.Linear4bit, LoRALinear)) for m in model.vision_tower.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.projector.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


def write_llava_data(root, n: int = 8) -> None:
    """LLaVA-Instruct's layout: a JSON list of {image: relative path, conversations: [...]}."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (36, 36), (30 * i, 200, 0)).save(root / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape"}, {"from": "gpt", "value": "green"},
            {"from": "human", "value": "where is it"}, {"from": "gpt", "value": "top left"}]})
    (root / "train.json").write_text(json.dumps(rows))


def run(config: str, sets: list[str]) -> dict:
    return train.main(["--config", str(ROOT / config), *sum((["--set", s] for s in sets), [])])


def test_two_stages_then_infer(tiny_llava_phi2, tmp_path):
    write_llava_data(tmp_path / "data")
    common = [f"model.name_or_path={tiny_llava_phi2}", f"data.dataset={tmp_path / 'data/train.json'}",
              f"data.image_root={tmp_path / 'data/images'}", "train.device=cpu", "train.save_every=0",
              "train.batch_size=2", "train.grad_accum=1"]
    stage1 = run("configs/llava_phi2_pretrain.toml", common + [f"train.output_dir={tmp_path / 's1'}", "train.max_steps=3",
                                                               "train.lr=1e-2"])
    assert stage1["steps"] == 3
    first = load_file(tmp_path / "s1/last/adapter.safetensors")
    assert set(first) == {f"projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}  # no LoRA in stage 1
    initial = llava_phi2.LlavaPhi.from_pretrained(tiny_llava_phi2).projector.state_dict()
    assert not torch.equal(first["projector.0.weight"], initial["0.weight"])

    stage2 = run("configs/llava_phi2.toml", common + [
        f"train.output_dir={tmp_path / 's2'}", f"train.init_from={tmp_path / 's1/last'}", "train.max_steps=4",
        "train.eval_every=2", "train.best_by=val_loss", "data.train_split=train[:6]", "data.eval_split=train[6:]", "data.eval_samples=0",
        "train.max_new_tokens=3"])
    assert stage2["steps"] == 4
    log = [json.loads(line) for line in (tmp_path / "s2/log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert list(evals) == [0, 2, 4]
    # The best is the lower validation loss of the two evaluations during training (step 0 is the
    # starting point, not a checkpoint), and `best` holds that step.
    best_step = min((2, 4), key=evals.get)
    assert stage2["best_val_loss"] == evals[best_step]
    assert json.loads((tmp_path / "s2/best/state.json").read_text())["step"] == best_step
    second = load_file(tmp_path / "s2/best/adapter.safetensors")
    assert any("lora_A" in k for k in second) and "projector.0.weight" in second

    image = tmp_path / "data/images/0.png"
    rows = infer.main(["--config", str(ROOT / "configs/llava_phi2.toml"), "--checkpoint", str(tmp_path / "s2/best"),
                       "--image", str(image), "--prompt", "what color is the shape",
                       "--set", f"model.name_or_path={tiny_llava_phi2}", "--set", "train.device=cpu",
                       "--set", "train.max_new_tokens=3"])
    assert isinstance(rows[0]["answer"], str)


@pytest.mark.parametrize("best_by, losses, scores, best_step", [
    ("val_loss", [1.0, 0.8, 0.9, 0.85, 0.7], [0.0] * 5, 2),      # lower loss is better
    ("metric", [1.0] * 5, [0.2, 0.5, 0.4, 0.45, 0.9], 2),        # higher score is better
])
def test_early_stopping_keeps_the_best(tiny_paligemma, shapes_data, tmp_path, monkeypatch, best_by, losses, scores,
                                       best_step):
    from minivlm import evaluate, loop
    from minivlm.data import load_split
    from minivlm.objectives import sft
    losses, scores = iter(losses), iter(scores)
    monkeypatch.setattr(sft, "validation_loss", lambda *a: next(losses))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a: {"score": next(scores)})
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=10, eval_every=1, early_stopping_patience=2,
                      best_by=best_by)
    result = loop.train(cfg, build(cfg), sft, load_split(cfg.data, "train"), eval_ds=load_split(cfg.data, "test"))
    assert result["stopped_early"] and result["step"] == 4
    assert result[f"best_{best_by}"] == (0.8 if best_by == "val_loss" else 0.5)
    assert json.loads((tmp_path / "best/state.json").read_text())["step"] == best_step
    assert json.loads((tmp_path / "last/state.json").read_text())["step"] == 4


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "a"}], r"expected alternating user/assistant \(human/gpt\) turns"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], r"expected alternating user/assistant \(human/gpt\) turns"),
])
def test_malformed_conversations_are_named(turns, message):
    from minivlm.config import ConfigError, DataConfig
    from minivlm.data import dialog_of
    with pytest.raises(ConfigError, match=message):
        dialog_of(DataConfig(conversations_column="conversations"), {"conversations": turns})
