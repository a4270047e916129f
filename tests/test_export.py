"""Export: our adapter loads into PEFT (the reference) with the same logits; a merged export
loads into plain transformers and answers like the adapter model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from minivlm.cli import train
from conftest import ROOT, tiny_config
from tiny import ARCHITECTURES
from minivlm import export
from minivlm.build import build
from minivlm.checkpoint import load_adapter
from minivlm.config import ConfigError, load_config
from minivlm.evaluate import answer
from minivlm.precision import model_inputs


def trained_adapter(cfg):
    """A built model with non-zero adapters, as training would leave it."""
    built = build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return built


def sample_batch(built):
    images = [[Image.new("RGB", (32, 32), (200, 40, 40))], [Image.new("RGB", (40, 32), (40, 40, 200))]]
    batch = built.family.training_batch(built.processor, images, [[("what color is the shape", "red")],
                                                                   [("where is it", "top left")]])
    return model_inputs(batch, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("family", ["paligemma", "idefics2", *ARCHITECTURES])
def test_peft_loads_our_adapter_with_the_same_logits(family, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{family}")
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family)
    config = peft_answers_alike(cfg, path, tmp_path)
    assert (config["r"], config["lora_alpha"]) == (cfg.lora.r, cfg.lora.alpha)


def test_peft_loads_an_rslora_adapter_with_the_same_logits(tiny_paligemma, tmp_path):
    """lora.use_rslora is written as PEFT's use_rslora: PEFT scales by alpha/√r too."""
    cfg = tiny_config(tiny_paligemma, tmp_path, tmp_path / "run")
    cfg.lora.use_rslora = True
    assert peft_answers_alike(cfg, tiny_paligemma, tmp_path)["use_rslora"] is True


def test_peft_loads_a_dora_adapter_with_the_same_logits(tiny_paligemma, tmp_path):
    """lora.use_dora: each magnitude written as PEFT's lora_magnitude_vector, and use_dora in the config."""
    cfg = tiny_config(tiny_paligemma, tmp_path, tmp_path / "run")
    cfg.lora.use_dora = True
    assert peft_answers_alike(cfg, tiny_paligemma, tmp_path)["use_dora"] is True


def test_peft_loads_vision_adapters_and_modules_to_save_with_the_same_logits(tiny_paligemma, tmp_path):
    """lora.vision's adapters go under target_modules like the decoder's; lora.train_modules (the
    projector, trained in full) as PEFT's modules_to_save, its tensors under their own names."""
    cfg = tiny_config(tiny_paligemma, tmp_path, tmp_path / "run")
    cfg.lora.vision, cfg.lora.train_modules = True, ["multi_modal_projector"]
    config = peft_answers_alike(cfg, tiny_paligemma, tmp_path)
    assert config["modules_to_save"] == ["multi_modal_projector"]
    assert any("vision_tower" in t for t in config["target_modules"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_loads_a_pissa_or_olora_adapter_on_the_original_base(init, tiny_paligemma, tmp_path):
    """Trained from W_res = W − s·B₀A₀, the adapter is written for the checkpoint's own W: rank 2r,
    [A; A₀] and [B, −B₀], alpha doubled (PEFT's path_initial_model_for_weight_conversion)."""
    cfg = tiny_config(tiny_paligemma, tmp_path, tmp_path / "run")
    cfg.lora.init = init
    config = peft_answers_alike(cfg, tiny_paligemma, tmp_path)
    assert (config["r"], config["lora_alpha"]) == (2 * cfg.lora.r, 2 * cfg.lora.alpha)


def peft_answers_alike(cfg, path, tmp_path) -> dict:
    """Our adapter on the float base, exported in PEFT's layout and loaded by PeftModel on the same
    base, gives the same logits; the exported adapter_config.json, returned."""
    cfg.quant.load_in_4bit = False  # the reference: PEFT on the float base, our adapter on ours
    built = trained_adapter(cfg)
    built.model.eval()
    inputs = sample_batch(built)
    with torch.no_grad():
        ours = built.model(**inputs).logits
    out = export.export_peft(cfg, built, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"

    base = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        plain = base(**inputs).logits
    assert not torch.allclose(plain, ours, atol=1e-3)  # the adapters matter, so the comparison means something
    peft_model = PeftModel.from_pretrained(base, out).eval()
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == len(built.adapted)
    assert sum(1 for n, _ in peft_model.named_parameters() if "magnitude" in n) == len(built.adapted) * cfg.lora.use_dora
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    return config


VISION = ["lora.vision=true", 'lora.train_modules=["multi_modal_projector"]']


@pytest.mark.parametrize("extra", [[], VISION, ["lora.use_dora=true"], ['lora.init="pissa"']],
                         ids=["decoder", "vision+projector", "dora", "pissa"])
def test_merged_export_loads_in_plain_transformers_and_answers_alike(extra, tiny_paligemma, shapes_data, tmp_path):
    """train.py (4-bit base) -> python -m minivlm.export --merge -> AutoModelForImageTextToText. With
    lora.vision, the tower's adapters are merged too (Unsloth users found theirs silently were not:
    unslothai/unsloth#1352): its weights are no longer the checkpoint's, and the logits still match."""
    sets = sum((["--set", s] for s in [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}",
                                         'data.eval_split=""', "train.eval_every=0", f"train.output_dir={tmp_path / 'run'}",
                                         "train.max_steps=3", "train.lr=5e-2", "train.max_new_tokens=4", *extra]), [])
    config = str(ROOT / "configs/demo.toml")
    train.main(["--config", config, *sets])
    out = export.main(["--config", config, "--checkpoint", str(tmp_path / "run/last"), "--out", str(tmp_path / "merged"),
                       "--merge", *sets])

    cfg = load_config(config, sets[1::2])
    built = build(cfg)
    load_adapter(tmp_path / "run/last", built.model)
    built.model.eval()
    inputs = sample_batch(built)
    images = [Image.new("RGB", (32, 32), (200, 40, 40))]
    with torch.no_grad():
        ours = built.model(**inputs).logits
    ours_text = answer(cfg, built, [images], ["what color is the shape"])[0]

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any(type(m).__name__ in ("Linear4bit", "LoRALinear") for m in merged.modules())
    original = AutoModelForImageTextToText.from_pretrained(tiny_paligemma).state_dict()
    changed = {n for n, w in merged.state_dict().items() if not torch.equal(w, original[n])}
    tower = {n for n in changed if "vision_tower" in n}
    vision = extra == VISION
    assert bool(tower) == vision and any("multi_modal_projector" in n for n in changed) == vision
    if vision:  # every linear of the tower's blocks, merged
        assert {n for n in tower if n.endswith(".weight")} == {n for n, w in original.items() if "vision_tower" in n
                                                                and ("_proj.weight" in n or "fc" in n) and w.ndim == 2}
    with torch.no_grad():
        theirs = merged(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # fp32 compute here; bf16 needs ~1e-2
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=[processor.image_token + "what color is the shape"], return_tensors="pt")
    generated = merged.generate(**batch, max_new_tokens=4, do_sample=False)
    assert processor.tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() == ours_text


def test_merge_refuses_a_non_transformers_model(tiny_llava_phi2, tmp_path):
    cfg = tiny_config(tiny_llava_phi2, tmp_path, tmp_path / "run", family="llava_phi2")
    with pytest.raises(ConfigError, match="not a transformers model"):
        export.export_merged(build(cfg), tmp_path / "merged")
