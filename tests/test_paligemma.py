"""The PaliGemma family: real processor, prefix-LM layout, labels on the answer + EOS only."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from minivlm.config import ConfigError, DataConfig
from minivlm.data import drop_too_long, load_split
from minivlm.models import paligemma


@pytest.fixture(scope="module")
def processor(tiny_paligemma):
    return AutoProcessor.from_pretrained(tiny_paligemma)


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(n)]


def test_labels_are_exactly_answer_plus_eos(processor):
    prompts = ["what color is the shape", "where is it"]
    answers = ["top left", "red"]
    batch = paligemma.training_batch(processor, images(2), prompts, answers)
    tok = processor.tokenizer
    for row, answer in enumerate(answers):
        labels = batch["labels"][row]
        labelled = labels[labels != -100]
        assert tok.decode(labelled) == f"{answer} {tok.eos_token}"
        assert labelled[-1].item() == tok.eos_token_id
        # Labels are the input ids at those positions (the model shifts them itself)...
        assert torch.equal(batch["input_ids"][row][labels != -100], labelled)
        # ...and sit at the end of the real tokens: nothing after them but padding.
        last = batch["attention_mask"][row].nonzero().max()
        assert (labels != -100).nonzero().max() == last
    image_positions = batch["input_ids"] == processor.image_token_id
    assert image_positions.sum(1).tolist() == [processor.image_seq_length] * 2
    assert (batch["labels"][image_positions] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding
    assert (batch["token_type_ids"][batch["labels"] != -100] == 1).all()  # suffix = prefix-LM "1"


def test_sequence_length_matches_processor(processor):
    batch = paligemma.training_batch(processor, images(1), ["what shape is it"], ["circle"])
    assert paligemma.sequence_length(processor, "what shape is it", "circle") == batch["input_ids"].shape[1]


def test_generation_batch_is_left_padded_without_labels(processor):
    batch = paligemma.generation_batch(processor, images(2), ["what", "what color is the shape"])
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()  # every row ends with its prompt
    assert batch["attention_mask"][0, 0] == 0


def test_too_long_samples_are_dropped_never_cut(processor, shapes_data):
    cfg = DataConfig(dataset=str(shapes_data), max_length=processor.image_seq_length + 7)
    ds = load_split(cfg, "train")
    with pytest.warns(UserWarning, match=r"dropped \d+ of 24 samples longer than data.max_length"):
        kept = drop_too_long(ds, cfg, paligemma, processor)
    assert 0 < len(kept) < len(ds)
    batch = paligemma.training_batch(processor, [im.convert("RGB") for im in kept["image"]],
                                     list(kept["question"]), list(kept["answer"]))
    assert batch["input_ids"].shape[1] <= cfg.max_length
    assert ((batch["input_ids"] == processor.image_token_id).sum(1) == processor.image_seq_length).all()
    cfg.max_length = processor.image_seq_length
    with pytest.raises(ConfigError, match="every sample is longer than data.max_length"):
        drop_too_long(ds, cfg, paligemma, processor)


def test_missing_columns_are_named(shapes_data):
    cfg = DataConfig(dataset=str(shapes_data), answer_column="multiple_choice_answer")
    with pytest.raises(ConfigError, match=r"no column\(s\) \['multiple_choice_answer'\].*answer_column"):
        load_split(cfg, "train")
