"""Generation: batched, left-padded greedy answers equal one-at-a-time answers; a group of
completions a prompt prefills each prompt once."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import random_b, tiny_config
from minivlm.build import build
from minivlm.evaluate import answer, generated, prefilled_once
from minivlm.models import get_family
from minivlm.precision import model_inputs
from tiny import ARCHITECTURES


@pytest.mark.parametrize("family", ["paligemma", "idefics2", "llava_phi2"])
def test_batched_answers_equal_one_at_a_time(family, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{family}")
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family, max_new_tokens=5)
    cfg.lora.dropout = 0.5  # never while generating, whatever mode training left the model in
    built = build(cfg)
    with torch.no_grad():  # a non-trivial adapter, so the LoRA path is part of what is compared
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    images = [[Image.new("RGB", (32 + 8 * i, 32), (60 * i, 120, 200 - 40 * i))] for i in range(3)]
    # Prompts of different lengths, so the batch really is padded.
    prompts = ["what color is the shape", "where", "what shape is it"]
    built.model.train()
    batched = answer(cfg, built, images, prompts)
    assert built.model.training
    single = [answer(cfg, built, [ims], [p])[0] for ims, p in zip(images, prompts)]
    assert batched == single
    assert any(batched)  # something was generated


@pytest.mark.parametrize("family", ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2"])
def test_batching_leaves_the_processor_as_it_was(family, request, tmp_path):
    """Families pad per call: a processor saved after training or generation keeps its settings."""
    from transformers import AutoProcessor

    from minivlm.models import get_family

    path = request.getfixturevalue(f"tiny_{family}")
    processor = get_family(family).load_processor(str(path))
    def state():
        tok = processor.tokenizer
        return dict(tok.init_kwargs, padding_side=tok.padding_side, backend_padding=tok.backend_tokenizer.padding,
                    backend_truncation=tok.backend_tokenizer.truncation)

    before = state()
    images = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (32, 32), (30, 30, 200))]]
    get_family(family).training_batch(processor, images, [[("what color is the shape", "red")], [("where", "top left")]])
    left = get_family(family).generation_batch(processor, images, ["what color is the shape", "where"])
    assert left["attention_mask"][1, 0] == 0  # generation did pad on the left
    assert state() == before
    if family == "paligemma":  # the embedded base's case: saved, reloaded, still right-padded
        processor.save_pretrained(tmp_path / "saved")
        assert AutoProcessor.from_pretrained(tmp_path / "saved").tokenizer.padding_side == before["padding_side"]


FAMILIES = ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2", *ARCHITECTURES]
PREFILLED = [name for name in FAMILIES if getattr(get_family(name), "PREFILL_ONCE", True)]


@pytest.mark.parametrize("family", PREFILLED)
def test_a_group_of_completions_prefills_each_prompt_once_and_decodes_as_generate(family, request, tmp_path):
    """GRPO's G completions a prompt: the prompts go through the decoder once (one row each, not G),
    and greedy decoding from the copied cache gives each of the G rows what one-per-prompt greedy
    decoding gives, token for token."""
    path = request.getfixturevalue(f"tiny_{family}")
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family)
    built = build(cfg)
    random_b(built.model, std=0.5)  # a non-trivial adapter, so the LoRA path is part of what is compared
    images = [[Image.new("RGB", (32 + 8 * i, 32), (60 * i, 120, 200 - 40 * i))] for i in range(2)]
    batch = built.family.generation_batch(built.processor, images, ["what color is the shape", "where"])
    rows = []
    embed = next(m for n, m in built.model.named_modules() if n.endswith(("embed_tokens", "wte")))
    hook = embed.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    grouped = generated(cfg, built, batch, max_new_tokens=5, do_sample=False, num_return_sequences=3)
    hook.remove()
    assert rows[0] == batch["input_ids"].shape  # the prefill: each prompt once, whole
    assert all(shape == (6, 1) for shape in rows[1:])  # then one new token a row, 3 rows a prompt
    one = generated(cfg, built, batch, max_new_tokens=5, do_sample=False)
    assert grouped.shape == (6, one.shape[1]) and one.shape[1] > 0
    assert torch.equal(grouped, one.repeat_interleave(3, 0))


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(PREFILLED)))
def test_families_that_decode_a_group_from_copied_prompts_cannot_go_on_from_one_prefill(family, request, tmp_path):
    """PREFILL_ONCE = False is earned: from one prefill's copied cache their generate fails or decodes
    other tokens; their groups still decode as one-per-prompt greedy decoding does."""
    cfg = tiny_config(request.getfixturevalue(f"tiny_{family}"), tmp_path, tmp_path / "run", family=family)
    built = build(cfg)
    images = [[Image.new("RGB", (32 + 8 * i, 32), (60 * i, 120, 200 - 40 * i))] for i in range(2)]
    batch = built.family.generation_batch(built.processor, images, ["what color is the shape", "where"])
    one = generated(cfg, built, batch, max_new_tokens=5, do_sample=False)
    built.model.eval()
    try:
        with torch.no_grad():
            inputs = prefilled_once(built.model, model_inputs(batch, built.device, torch.float32), 3)
            out = built.model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert not torch.equal(out[:, batch["input_ids"].shape[1]:], one.repeat_interleave(3, 0))
    except (ValueError, RuntimeError, TypeError):
        pass
    torch.manual_seed(0)
    sampled = generated(cfg, built, batch, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(sampled, one.repeat_interleave(3, 0))  # top_k = 1: sampling that can only be greedy


def test_sampled_groups_draw_as_generate_does(tiny_paligemma, tmp_path):
    """Sampling from the copied cache draws what generate(num_return_sequences=G) draws from the same seed."""
    cfg = tiny_config(tiny_paligemma, tmp_path, tmp_path / "run")
    built = build(cfg)
    images = [[Image.new("RGB", (32, 32), (200, 40, 40))], [Image.new("RGB", (32, 32), (40, 40, 200))]]
    batch = built.family.generation_batch(built.processor, images, ["what color is the shape", "where"])
    settings = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)
    torch.manual_seed(3)
    ours = generated(cfg, built, batch, num_return_sequences=4, **settings)
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = built.model.generate(**batch, num_return_sequences=4, **settings)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs)
    assert len({tuple(row.tolist()) for row in ours}) > 2  # it did sample
