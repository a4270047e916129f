"""Every architecture of today's VLM fine-tuning, on a tiny random-weight model of its real classes
(tests/tiny.py), through the same checks: the label mask, batched generation, streamed loading,
the merged export (the PEFT one: tests/test_export.py), the planner at two resolutions,
token-normalised accumulation, exact resume."""

from __future__ import annotations

import json
import re

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, count_steps, crash_after_first_save, saved_for_backward, tiny_config
from minivlm import export
from minivlm.batches import collate
from minivlm.build import build
from minivlm.data import load_split
from minivlm.evaluate import answer
from minivlm.loop import train
from minivlm.models import get_family
from minivlm.models.processor import image_token_id
from minivlm.objectives import sft
from minivlm.plan import plan_memory
from test_export import sample_batch, trained_adapter
from tiny import ARCHITECTURES
from test_loop import built_with_nonzero_b, grads_after
from test_load import assert_same_logits, assert_same_model, reference, streamed



@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(params=[a for a in ARCHITECTURES if get_family(a).RESOLUTION])
def resizable(request):
    """The architectures whose processor has resolution keys (Llama 3.2 Vision's has none)."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def images(sizes: list[tuple[int, int]]) -> list[list[Image.Image]]:
    """One plain image for each sample, of the given sizes, each its own colour: under dynamic
    resolution, each size is its own number of image tokens."""
    return [[Image.new("RGB", size, (200, 40 * i % 255, 30 * i % 255))] for i, size in enumerate(sizes)]


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    """The runs of consecutive labelled positions of one row, as token lists."""
    spans, run = [], []
    for label in labels.tolist() + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            spans, run = spans + [run], []
    return spans


@pytest.mark.parametrize("system", ["", "be brief"])
def test_labels_are_each_answer_and_its_end_of_turn(arch, system):
    name, path = arch
    family = get_family(name)
    processor = family.load_processor(str(path))
    tok = processor.tokenizer
    dialogs = [[("where is the shape", "top left")],
               [("what color is it", "red"), ("and the shape", "a blue circle"), ("where", "bottom right")]]
    batch = family.training_batch(processor, images([(48, 32), (32, 64)]), dialogs, system=system)
    end = tok.convert_tokens_to_ids(family.END_OF_TURN)
    for row, dialog in enumerate(dialogs):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        expected = [tok(a, add_special_tokens=False)["input_ids"] + [end] for _, a in dialog]
        assert labelled_spans(labels) == expected
        labelled = labels != -100
        assert torch.equal(ids[labelled], labels[labelled])
    assert (batch["labels"][batch["input_ids"] == image_token_id(processor)] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # the two images differ in size, so in image tokens: the rows really were padded
    assert (batch["attention_mask"] == 0).any()


def test_batched_left_padded_generation_equals_one_at_a_time(arch, shapes_data, tmp_path):
    name, path = arch
    cfg = tiny_config(path, shapes_data, tmp_path, family=name, max_new_tokens=6)
    built = build(cfg)
    ims = images([(32, 32), (64, 48), (40, 24)])
    prompts = ["where is the shape", "what color", "what is in the picture"]
    together = answer(cfg, built, ims, prompts)
    alone = [answer(cfg, built, [im], [p])[0] for im, p in zip(ims, prompts)]
    assert together == alone and any(together)


def test_streamed_4bit_load_equals_from_pretrained_then_quantize(arch):
    name, path = arch
    ref, model = reference(name, path, torch.float32), streamed(name, path, torch.float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert_same_model(model, ref)
    assert_same_logits(name, path, model, ref)


def with_trained_adapter(cfg):
    built = trained_adapter(cfg)
    built.model.eval()
    return built


def test_merged_export_loads_in_plain_transformers_and_answers_alike(arch, shapes_data, tmp_path):
    name, path = arch
    cfg = tiny_config(path, shapes_data, tmp_path / "run", family=name, max_new_tokens=5)
    built = with_trained_adapter(cfg)
    inputs = sample_batch(built)
    prompt, image = "what color is the shape", images([(48, 32)])
    with torch.no_grad():
        ours = built.model(**inputs).logits
    ours_text = answer(cfg, built, image, [prompt])[0]
    out = export.export_merged(built, tmp_path / "merged")

    merged = built.family.MODEL_CLASS.from_pretrained(out).eval()
    assert not any(type(m).__name__ in ("Linear4bit", "LoRALinear") for m in merged.modules())
    with torch.no_grad():
        theirs = merged(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    processor = built.family.load_processor(str(out))
    batch = built.family.generation_batch(processor, image, [prompt])
    generated = merged.generate(**batch, max_new_tokens=5, do_sample=False)
    assert processor.tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() \
        == ours_text


QWEN = [({"max_pixels": 32 * 32}, (32, 32)), ({"max_pixels": 64 * 64}, (64, 64))]
# Gemma 3: one view of 4 tokens, or with pan-and-scan a 3:1 image as the whole and 2 crops.
GEMMA3 = [({"do_pan_and_scan": False}, (32, 32)),
          ({"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16, "pan_and_scan_max_num_crops": 2}, (96, 32))]
# SmolVLM2: a 64 px image whole (one 32 px view), or cut into 2×2 tiles of 32 px + the global view.
SMOLVLM = [({"do_image_splitting": False, "size": {"longest_edge": 32}}, (64, 64)),
           ({"do_image_splitting": True, "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}, (64, 64))]
# LLaVA-OneVision: a 128 px image as one crop (+ the whole), or as a 4×4 grid of crops, whose 16²
# features exceed anyres_max_9's 9 crops' worth and are scaled down to 12² (+ 12 newlines).
ONEVISION = [({"image_grid_pinpoints": [[32, 32]]}, (128, 128)),
             ({"image_grid_pinpoints": [[32, 32], [128, 128]]}, (128, 128))]
# InternVL: a wide image as one tile, or as up to 4 tiles (2×2, 1×4...) + the thumbnail.
INTERNVL = [({"crop_to_patches": False}, (128, 32)), ({"crop_to_patches": True, "max_patches": 4}, (128, 32))]
RESOLUTIONS = {"qwen2_5_vl": QWEN, "qwen2_vl": QWEN, "qwen3_vl": QWEN, "gemma3": GEMMA3, "smolvlm2": SMOLVLM,
               "llava_onevision": ONEVISION, "internvl": INTERNVL,
               # Mistral 3: a 64 px image at longest_edge 32 (2×2 tokens) or 64 (4×4).
               "mistral3": [({"size": {"longest_edge": 32}}, (64, 64)), ({"size": {"longest_edge": 64}}, (64, 64))],
               # Llama 3.2 Vision has no resolution keys: an image of one tile, one of 2×2 (both padded to 4).
               "mllama": [({}, (64, 64)), ({}, (128, 128))]}
# An image of few tokens beside the large one. Idefics3's processor scales every image up or down
# to size.longest_edge: there only a flatter one is fewer tiles.
SMALL = {"smolvlm2": (64, 16)}


def counted(name: str, batch: dict, processor) -> str:
    """What the plan must say it counted of the first row's image: its image tokens, or for
    Llama 3.2 Vision (no image tokens; the image enters by cross-attention) its tiles."""
    if name == "mllama":
        return f"up to {batch['pixel_values'].shape[2]} tiles"
    return f"{int((batch['input_ids'][0] == image_token_id(processor)).sum())} image tokens"


@pytest.mark.parametrize("setting", [0, 1])
def test_planned_activations_match_what_autograd_saves_at_two_resolutions(arch, tmp_path, setting):
    """The plan counts image tokens from model.processor's resolution keys; at the largest image
    they allow, what it plans to keep for backward is within 15% of what autograd keeps."""
    name, path = arch
    resolution, size = RESOLUTIONS[name][setting]
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=name, batch_size=2)
    cfg.model.processor = resolution
    built = build(cfg)
    batch = built.family.training_batch(built.processor, images([size, size]),
                                        [[("what shape is it", "a red circle")]] * 2)
    cfg.data.max_length = batch["input_ids"].shape[1]
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum()) / 2
    plan = plan_memory(cfg, answer_tokens=answer_tokens)
    assert counted(name, batch, built.processor) in plan.tokens  # the plan counted this resolution's tokens
    actual = saved_for_backward(built.model, lambda: sft.answer_loss_sum(cfg, built, batch).backward())
    assert abs(plan.act_saved - actual) < 0.15 * actual, (plan.act_saved, actual)


@pytest.mark.parametrize("name", [a for a in ARCHITECTURES if get_family(a).MAX_IMAGES is None])
def test_the_plan_counts_data_max_images_images_per_sample(name, request, tmp_path):
    """Two images a sample (data.max_images = 2) in the families that take several: the plan counts
    each image's tokens as the processor makes them beside another (LLaVA-OneVision's without its
    anyres crops), and what it keeps for backward is within 15% of what autograd keeps."""
    path = request.getfixturevalue(f"tiny_{name}")
    resolution, size = RESOLUTIONS[name][0]
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=name, batch_size=2)
    cfg.model.processor, cfg.data.max_images = resolution, 2
    built = build(cfg)
    two = [ims + other for ims, other in zip(images([size, size]), images([size, size]))]
    batch = built.family.training_batch(built.processor, two, [[("what shapes are these", "a red circle")]] * 2)
    cfg.data.max_length = batch["input_ids"].shape[1]
    plan = plan_memory(cfg, answer_tokens=int((batch["labels"][:, 1:] != -100).sum()) / 2)
    each = int(re.search(r"2 images per sample, each (?:up to )?(\d+) image tokens", plan.tokens).group(1))
    assert ((batch["input_ids"] == image_token_id(built.processor)).sum(1) == 2 * each).all(), plan.tokens
    actual = saved_for_backward(built.model, lambda: sft.answer_loss_sum(cfg, built, batch).backward())
    assert abs(plan.act_saved - actual) < 0.15 * actual, (plan.act_saved, actual)


def test_batch4_accum1_equals_batch1_accum4(arch, shapes_data, tmp_path):
    name, path = arch
    cfg = tiny_config(path, shapes_data, tmp_path, family=name)
    built = built_with_nonzero_b(cfg)
    ds = load_split(cfg.data, "train")
    idx = [0, 1, 2, 3]
    assert len({len(a.split()) for a in ds[idx]["answer"]}) > 1  # answers of different lengths
    one_batch = grads_after(cfg, built, [collate(ds, idx, cfg.data, built.family, built.processor)])
    accumulated = grads_after(cfg, built, [collate(ds, [i], cfg.data, built.family, built.processor) for i in idx])
    for n in one_batch:
        torch.testing.assert_close(accumulated[n], one_batch[n], rtol=1e-4, atol=1e-6)
    assert any(accumulated[n].abs().sum() > 0 for n in accumulated if "lora_A" in n)


def test_train_save_resume_is_bit_exact(arch, shapes_data, tmp_path, monkeypatch):
    name, path = arch

    def cfg_for(out):
        cfg = tiny_config(path, shapes_data, out, family=name, optimizer="adamw_8bit", batch_size=2, grad_accum=2,
                          max_steps=4, warmup_steps=1, lr=5e-3, save_every=2)
        cfg.lora.dropout = 0.1  # the RNG state must be restored too
        return cfg

    ds = load_split(cfg_for(tmp_path).data, "train")
    train(cfg_for(tmp_path / "full"), build(cfg_for(tmp_path / "full")), sft, ds)
    split = cfg_for(tmp_path / "split")
    crash_after_first_save(monkeypatch, lambda: train(split, build(split), sft, ds))
    assert json.loads((tmp_path / "split/last/state.json").read_text())["step"] == 2
    trained = count_steps(monkeypatch, sft)
    train(cfg_for(tmp_path / "split"), build(cfg_for(tmp_path / "split")), sft, ds, resume=tmp_path / "split/last")
    assert len(trained) == 2  # steps 3-4: it went on from its save
    for f in ("adapter", "state"):
        a, b = load_file(tmp_path / f"full/last/{f}.safetensors"), load_file(tmp_path / f"split/last/{f}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    adapter = load_file(tmp_path / "full/last/adapter.safetensors")
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained


def test_dry_run_counts_image_tokens_at_the_configured_resolution():
    """configs/qwen2_5_vl.toml on the real config.json: the checkpoint's own max_pixels is 16384
    tokens an image, which no max_length of the recipe holds; the recipe's max_pixels is 512."""
    from minivlm.config import load_config
    sets = [f"model.name_or_path={ROOT / 'configs/real/Qwen2.5-VL-7B-Instruct'}"]
    recipe = plan_memory(load_config(ROOT / "configs/qwen2_5_vl.toml", sets))
    assert "up to 512 image tokens" in recipe.tokens and not recipe.notes
    default = plan_memory(load_config(ROOT / "configs/qwen2_5_vl.toml", sets + ["model.processor.max_pixels=12845056"]))
    assert "up to 16384 image tokens" in default.tokens
    assert any("such samples are dropped" in n and "max_pixels" in n for n in default.notes)
    assert default.vision_transient > 20 * recipe.vision_transient


def test_the_plan_counts_what_the_processor_does_at_call_time(tiny_internvl, tmp_path):
    """InternVL's image processor is saved with crop_to_patches off, and its processor turns it on
    at every call: the plan counts the tiles the processor really makes."""
    from minivlm.models import internvl
    processor = internvl.load_processor(str(tiny_internvl))
    assert not processor.image_processor.crop_to_patches
    batch = internvl.training_batch(processor, images([(128, 32)]), [[("where is the shape", "top left")]])
    tokens = int((batch["input_ids"] == image_token_id(processor)).sum())
    assert tokens > 4  # more than one tile's
    plan = plan_memory(tiny_config(tiny_internvl, tmp_path, tmp_path / "run", family="internvl"))
    assert f"up to {tokens} image tokens" in plan.tokens


def test_an_unknown_resolution_key_is_named_with_the_known_ones(resizable, tmp_path):
    from minivlm.build import load_processor
    from minivlm.config import ConfigError
    name, path = resizable
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=name)
    cfg.model.processor = {"max_pixel": 1024}
    family = get_family(name)
    with pytest.raises(ConfigError, match=f"has no max_pixel; its resolution controls are {', '.join(family.RESOLUTION)}$"):
        load_processor(cfg)


def test_a_sample_too_long_for_max_length_is_dropped_whole_and_named(resizable, tmp_path):
    """Under dynamic resolution a large image alone can exceed data.max_length: that sample is
    dropped, with its length, its image tokens and the keys that shrink them; the rest is
    processed again, its image tokens and pixels intact."""
    from minivlm.batches import within_max_length
    from minivlm.config import DataConfig
    name, path = resizable
    family = get_family(name)
    resolution, large = RESOLUTIONS[name][1]  # the setting under which an image can be many tokens
    processor = family.load_processor(str(path), **resolution)
    ims = images([SMALL.get(name, (32, 32)), large])
    dialogs = [[("where is the shape", "top left")], [("what color", "red")]]
    full = family.training_batch(processor, ims, dialogs)
    tokens = (full["input_ids"] == image_token_id(processor)).sum(1)
    assert tokens[1] > tokens[0]
    cfg = DataConfig(max_length=int(full["attention_mask"][0].sum()))
    with pytest.warns(UserWarning, match=rf"dropped sample\(s\) 8 \(\d+ tokens, {tokens[1]} of them image tokens\): "
                                         rf"longer than data.max_length = {cfg.max_length}.*{family.RESOLUTION[-1]}"):
        kept = within_max_length(family, processor, ims, dialogs, cfg, [7, 8])
    alone = family.training_batch(processor, ims[:1], dialogs[:1])
    assert kept.keys() == alone.keys()
    for key in kept:
        assert torch.equal(kept[key], alone[key]), key
    assert (kept["input_ids"] == image_token_id(processor)).sum() == tokens[0]


# Each family's recipe, the real checkpoint's config.json (configs/real/) and its published size.
RECIPES = {"qwen2_5_vl": ("qwen2_5_vl.toml", "Qwen2.5-VL-7B-Instruct", 8.29e9),
           "qwen2_vl": ("qwen2_vl.toml", "Qwen2-VL-7B-Instruct", 8.29e9),
           "qwen3_vl": ("qwen3_vl.toml", "Qwen3-VL-4B-Instruct", 4.44e9),
           "gemma3": ("gemma3.toml", "gemma-3-4b-it", 4.30e9),
           "smolvlm2": ("smolvlm2.toml", "SmolVLM2-2.2B-Instruct", 2.25e9),
           "llava_onevision": ("llava_onevision.toml", "llava-onevision-qwen2-7b-ov-hf", 8.03e9),
           "internvl": ("internvl.toml", "InternVL3-8B-hf", 7.94e9),
           "mistral3": ("mistral3.toml", "Mistral-Small-3.1-24B-Instruct-2503", 24.0e9),
           "mllama": ("mllama.toml", "Llama-3.2-11B-Vision-Instruct", 10.67e9)}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_recipe_plans_to_fit_24_gib_on_the_real_checkpoint(name):
    from minivlm.config import load_config
    from minivlm.plan import GiB
    recipe, checkpoint, size = RECIPES[name]
    cfg = load_config(ROOT / "configs" / recipe, [f"model.name_or_path={ROOT / 'configs/real' / checkpoint}"])
    assert cfg.model.family == name
    plan = plan_memory(cfg)
    assert abs(plan.quant_params + plan.float_params - size) < 0.005 * size  # the config is the real model's
    assert plan.total() < 24 * GiB and not plan.notes


def test_the_resolution_keys_reach_the_processor(resizable):
    """The same large image is fewer tokens under the first setting than under the second."""
    name, path = resizable
    family = get_family(name)
    (small_setting, _), (large_setting, large) = RESOLUTIONS[name]
    counts = []
    for setting in (small_setting, large_setting):
        processor = family.load_processor(str(path), **setting)
        batch = family.training_batch(processor, images([large]), [[("where is the shape", "top left")]])
        counts.append(int((batch["input_ids"] == image_token_id(processor)).sum()))
    assert 0 < counts[0] < counts[1], counts
