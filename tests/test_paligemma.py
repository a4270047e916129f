"""The PaliGemma family: real processor, prefix-LM layout, labels on the answer + EOS only."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from minivlm.config import ConfigError, DataConfig
from minivlm.batches import check_samples, collate
from minivlm.data import load_split
from minivlm.models import FAMILIES, get_family, paligemma


@pytest.fixture(scope="module")
def processor(tiny_paligemma):
    return AutoProcessor.from_pretrained(tiny_paligemma)


def images(n: int) -> list[list[Image.Image]]:
    """One image for each of `n` samples."""
    return [[Image.new("RGB", (40, 30), (i * 40, 0, 0))] for i in range(n)]


def test_labels_are_exactly_answer_plus_eos(processor):
    prompts = ["what color is the shape", "where is it"]
    answers = ["top left", "red"]
    batch = paligemma.training_batch(processor, images(2), [[(p, a)] for p, a in zip(prompts, answers)])
    tok = processor.tokenizer
    for row, answer in enumerate(answers):
        labels = batch["labels"][row]
        labelled = labels[labels != -100]
        assert labelled[:-1].tolist() == tok(answer, add_special_tokens=False)["input_ids"]
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


def test_generation_batch_is_left_padded_without_labels(processor):
    batch = paligemma.generation_batch(processor, images(2), ["what", "what color is the shape"])
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()  # every row ends with its prompt
    assert batch["attention_mask"][0, 0] == 0


def test_too_long_samples_are_dropped_never_cut(processor, shapes_data):
    # Each word is one token; around them <bos>, the "\n" ending the prompt and <eos>.
    cfg = DataConfig(dataset=str(shapes_data), max_length=processor.image_seq_length + 8)
    ds = load_split(cfg, "train")
    lengths = [len(q.split()) + len(a.split()) for q, a in zip(ds["question"], ds["answer"])]
    idx = [i for i, n in enumerate(lengths) if n == 5][:2] + [i for i, n in enumerate(lengths) if n > 5][:2]
    long = r"\d+ \(2[5-9] tokens, 16 of them image tokens\)"  # the sample, its length, the image's share
    with pytest.warns(UserWarning, match=rf"dropped sample\(s\) {long}, {long}: longer than data.max_length = 24"):
        batch = collate(ds, idx, cfg, paligemma, processor)
    assert batch["input_ids"].shape == (2, cfg.max_length) and batch["pixel_values"].shape[0] == 2
    assert ((batch["input_ids"] == processor.image_token_id).sum(1) == processor.image_seq_length).all()
    assert (batch["labels"] != -100).sum() == 4  # two one-word answers + EOS each, intact
    cfg.max_length = processor.image_seq_length
    with pytest.warns(UserWarning, match="dropped"):
        empty = collate(ds, idx, cfg, paligemma, processor)
    assert empty["input_ids"].shape[0] == 0


def test_system_prompt_is_refused():
    """PaliGemma says it has no chat template (CHAT = False); the data layer refuses what needs one."""
    with pytest.raises(ConfigError, match="PaliGemma has no system turn"):
        check_samples(paligemma, images(1), [[("what", "red")]], system="be brief")
    chat = ", ".join(name for name in FAMILIES if get_family(name).CHAT)
    assert "idefics2" in chat and "paligemma" not in chat
    with pytest.raises(ConfigError, match=rf"PaliGemma learns one question per sample; .*\({chat}\)"):
        check_samples(paligemma, images(1), [[("what", "red"), ("where", "top")]], system="")


def test_a_second_image_is_refused_naming_the_families_that_take_several():
    several = [name for name in FAMILIES if get_family(name).MAX_IMAGES is None]
    assert {"qwen2_5_vl", "idefics2", "smolvlm", "gemma3"} <= set(several) and "paligemma" not in several
    check_samples(paligemma, images(3), [[("what", "red")]] * 3, system="")  # one each: fine
    with pytest.raises(ConfigError, match=rf"PaliGemma takes 1 image per sample and a sample here holds 2; "
                                          rf"several images per sample need one of {', '.join(several)}"):
        check_samples(paligemma, [images(1)[0], images(2)[0] + images(2)[1]], [[("what", "red")]] * 2, system="")


def test_missing_columns_are_named(shapes_data):
    cfg = DataConfig(dataset=str(shapes_data), answer_column="multiple_choice_answer")
    with pytest.raises(ConfigError, match=r"no column\(s\) \['multiple_choice_answer'\].*answer_column"):
        load_split(cfg, "train")
