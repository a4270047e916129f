"""Generation: batched, left-padded greedy answers equal one-at-a-time answers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from minivlm.build import build
from minivlm.evaluate import answer


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
