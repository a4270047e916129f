"""The chat-template families (Idefics2, SmolVLM): real processors, assistant-only labels,
quantization scope, and their seed configs running 3 steps on tiny models of the real classes."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from minivlm.cli import train
from conftest import ROOT, tiny_config, write_split
from minivlm.build import build
from minivlm.config import DataConfig
from minivlm.batches import collate
from minivlm.data import load_split
from minivlm.lora import LoRALinear
from minivlm.models import get_family

FAMILIES = ["idefics2", "smolvlm"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def images(n: int) -> list[list[Image.Image]]:
    """One image for each of `n` samples."""
    return [[Image.new("RGB", (40 + 20 * i, 30), (200, 40 * i, 0))] for i in range(n)]


@pytest.mark.parametrize("system", ["", "be brief"])
def test_labels_are_the_assistant_answer_and_end_of_turn(family, system):
    name, path = family
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    answers = ["top left", "red"]
    dialogs = [[(q, a)] for q, a in zip(["where is the shape", "what color is it"], answers)]
    batch = get_family(name).training_batch(processor, images(2), dialogs, system=system)
    end_id = tok.convert_tokens_to_ids("<end_of_utterance>")
    assistant_id = tok.convert_tokens_to_ids("Assistant")
    for row, answer in enumerate(answers):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        labelled = labels[labels != -100]
        assert labelled.tolist() == tok(answer, add_special_tokens=False)["input_ids"] + [end_id]
        assert tok.decode(labelled) == f"{answer} <end_of_utterance>"
        positions = (labels != -100).nonzero().squeeze(1)
        assert torch.equal(ids[positions], labelled)
        assert positions.min() > (ids == assistant_id).nonzero().max()  # nothing of the prompt
        assert (positions.diff() == 1).all()  # one contiguous span
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # The real processor split each image into 4 crops + the whole image.
    assert batch["pixel_values"].shape[:2] == (2, 5)


def test_too_long_sample_is_dropped_not_cut(family, shapes_data):
    name, path = family
    processor = AutoProcessor.from_pretrained(path)
    cfg = DataConfig(dataset=str(shapes_data))
    ds = load_split(cfg, "train")
    full = collate(ds, [0, 1, 2, 3], cfg, get_family(name), processor)
    lengths = full["attention_mask"].sum(1)
    cfg.max_length = int(lengths.min())
    with pytest.warns(UserWarning, match="longer than data.max_length"):
        kept = collate(ds, [0, 1, 2, 3], cfg, get_family(name), processor)
    n = int((lengths <= cfg.max_length).sum())
    assert kept["input_ids"].shape == (n, cfg.max_length) and kept["pixel_values"].shape[0] == n
    image_tokens = (full["input_ids"] == processor.image_token_id).sum(1)
    assert ((kept["input_ids"] == processor.image_token_id).sum(1) == image_tokens[0]).all()


def test_quantization_scope(family, shapes_data, tmp_path):
    name, path = family
    cfg = tiny_config(path, shapes_data, tmp_path, family=name)
    model = build(cfg).model
    projections = {n for n, m in model.named_modules() if n.startswith("model.text_model.layers.")
                   and n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    assert len(projections) == 14
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == projections
    assert {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == {f"{n}.base" for n in projections}
    for part in ["model.vision_model", "model.connector", "lm_head", "model.text_model.embed_tokens"]:
        module = model.get_submodule(part)
        assert not any(isinstance(m, (bnb.nn.Linear4bit, LoRALinear)) for m in module.modules()), part
        assert not any(p.requires_grad for p in module.parameters()), part
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.lora_{x}" for n in projections for x in "AB"}


SEED_COLUMNS = {"idefics2": ("question", "answers"), "smolvlm": ("query", "label")}


def test_seed_config_trains_three_steps(family, tmp_path):
    name, path = family
    question_col, answer_col = SEED_COLUMNS[name]
    data = tmp_path / "data"
    write_split(data / "train", 8, seed=4)
    meta = data / "train/metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({"file_name": r["file_name"], question_col: r["question"],
                                        answer_col: [r["answer"], "other"]}) + "\n" for r in rows))
    sets = [f"model.name_or_path={path}", f"data.dataset={data}", 'data.eval_split=""',
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.device=cpu"]
    metrics = train.main(["--config", str(ROOT / f"configs/{name}.toml"), *sum((["--set", s] for s in sets), [])])
    assert metrics["steps"] == 3 and 0 < metrics["trainable_params"] < metrics["total_params"]
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    adapter = load_file(tmp_path / "run/last/adapter.safetensors")
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapter.items())


def test_idefics_labels_are_the_answer_and_eos(tiny_idefics):
    processor = AutoProcessor.from_pretrained(tiny_idefics)
    tok = processor.tokenizer
    prompt = "Question: What's on the picture? Answer:"
    answers = ["This is red circle", "This is blue"]
    batch = get_family("idefics").training_batch(processor, images(2), [[(prompt, a)] for a in answers])
    answer_start = tok.convert_tokens_to_ids("Answer")
    for row, answer in enumerate(answers):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        labelled = labels[labels != -100]
        assert labelled.tolist() == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        positions = (labels != -100).nonzero().squeeze(1)
        assert positions.min() > (ids == answer_start).nonzero().max() + 1  # not even the ":" after "Answer"
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_idefics_seed_config_with_urls_as_paths(tiny_idefics, tmp_path):
    """configs/idefics.toml: image_url column (here local paths), answer from two columns, RGBA images,
    random resized crops, fp16, q/k/v LoRA in self- and cross-attention, 3 steps."""
    rows = []
    for i, color in enumerate(["red", "blue", "green", "white"]):
        path = tmp_path / f"card{i}.png"
        Image.new("RGBA", (40, 56), (200, 20 * i, 0, 128)).save(path)
        rows.append({"image_url": str(path), "name": color, "caption": f"{color} circle top left. More text"})
    (tmp_path / "cards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"model.name_or_path={tiny_idefics}", f"data.dataset={tmp_path / 'cards.jsonl'}", "data.train_split=train",
            'data.eval_split=""', f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.save_every=0",
            "train.device=cpu"]
    metrics = train.main(["--config", str(ROOT / "configs/idefics.toml"), *sum((["--set", s] for s in sets), [])])
    assert metrics["steps"] == 3
    adapter = load_file(tmp_path / "run/last/adapter.safetensors")
    adapted = {k.rsplit(".", 1)[0] for k in adapter}
    assert any(".cross_attn.q_proj" in k for k in adapted) and any(".self_attn.v_proj" in k for k in adapted)
    assert not any("vision_model" in k or "o_proj" in k for k in adapted)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapter.items())
    model = build(tiny_config(tiny_idefics, tmp_path, tmp_path / "scope", family="idefics")).model
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.vision_model.modules())
    assert type(model.lm_head).__name__ == "IdeficsDecoupledLinear"
