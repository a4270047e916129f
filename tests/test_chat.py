"""models/chat.py: several images per sample, each where its <image> marker stands, and the label
mask on every answer whatever turn the images sit in, for every family whose processor takes
several (the real processors of tiny models, tests/tiny.py). LLaVA-OneVision processes an image
differently when its sample holds several (no anyres crops), so an answer's place cannot be
computed from its turns' images alone: it is found."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from minivlm.models import FAMILIES, chat, get_family
from minivlm.models.processor import image_token_id
from test_architectures import labelled_spans

SEVERAL = [name for name in FAMILIES if get_family(name).MAX_IMAGES is None]

# Three-exchange dialogs whose two images sit in the first, the middle, the last user turn, split
# between the first and the last, and mid-sentence; each exchange's answer is its own words.
PLACEMENTS = {
    "first": ["<image><image>what changed", "where is it now", "and its colour"],
    "middle": ["what is the task", "<image> then <image>: what changed", "and its colour"],
    "last": ["what is the task", "where is it now", "compare <image> with <image>"],
    "split": ["<image> look at this", "where is it now", "now <image>: and its colour"],
    "unmarked": ["what changed", "where is it now", "and its colour"],  # both go in the first turn
}
ANSWERS = ["the shape moved", "top left", "a blue circle"]


def two_images() -> list[Image.Image]:
    # Different sizes: under dynamic resolution, a different number of tokens each.
    return [Image.new("RGB", (48, 32), (200, 40, 40)), Image.new("RGB", (32, 64), (40, 40, 200))]


@pytest.fixture(params=SEVERAL)
def several(request):
    name = request.param
    return name, get_family(name).load_processor(str(request.getfixturevalue(f"tiny_{name}")))


def test_the_families_that_take_several_images_are_those_the_issue_names():
    assert set(SEVERAL) == {"idefics2", "smolvlm", "smolvlm2", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "gemma3",
                            "llava_onevision", "internvl", "mistral3"}


def test_markers_place_images_and_no_markers_put_them_all_first():
    dialog = [(q, a) for q, a in zip(PLACEMENTS["split"], ANSWERS)]
    turns = chat.messages(dialog, two_images())
    assert [t["content"] for t in turns if t["role"] == "user"] == [
        [{"type": "image"}, {"type": "text", "text": "look at this"}],
        [{"type": "text", "text": "where is it now"}],
        [{"type": "text", "text": "now"}, {"type": "image"}, {"type": "text", "text": ": and its colour"}]]
    unmarked = chat.messages([(q, a) for q, a in zip(PLACEMENTS["unmarked"], ANSWERS)], two_images() * 2, upto=2,
                             answered=False)
    assert unmarked[0]["content"] == [{"type": "image"}] * 4 + [{"type": "text", "text": "what changed"}]
    assert [t["role"] for t in unmarked] == ["user", "assistant", "user"]
    assert chat.media_counts(dialog, 2) == [1, 0, 1]
    assert chat.plain("<image>\nwhat is it") == "what is it"


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_answer_is_labelled_wherever_the_images_sit(several, placement):
    name, processor = several
    family = get_family(name)
    tok = processor.tokenizer
    dialogs = [[(q, a) for q, a in zip(PLACEMENTS[placement], ANSWERS)], [("what shape is it", "circle")]]
    batch = family.training_batch(processor, [two_images(), two_images()[:1]], dialogs)
    end = tok.convert_tokens_to_ids(family.END_OF_TURN)
    ids, labels = batch["input_ids"], batch["labels"]
    for row, dialog in enumerate(dialogs):
        assert labelled_spans(labels[row]) == [tok(a, add_special_tokens=False)["input_ids"] + [end] for _, a in dialog]
        labelled = labels[row] != -100
        assert torch.equal(ids[row][labelled], labels[row][labelled])
    image = ids == image_token_id(processor)
    assert not (labels[image] != -100).any()  # image tokens are never labelled
    # The images are where the markers put them: none before the first answer when they sit in
    # the last turn, one on each side of the first answer when split.
    first_answer_end = (labels[0] != -100).nonzero()[len(tok(ANSWERS[0], add_special_tokens=False)["input_ids"])]
    before = image[0, :first_answer_end].any().item()
    after = image[0, first_answer_end:].any().item()
    assert (before, after) == {"first": (True, False), "middle": (False, True), "last": (False, True),
                               "split": (True, True), "unmarked": (True, False)}[placement]


def test_an_answer_the_question_ends_with_is_labelled_in_the_answer_not_the_question(several):
    """Each answer is found with the header the template writes before it, after the previous
    answer: a user turn that ends in the very tokens of the answer and its end is not taken for it."""
    name, processor = several
    family = get_family(name)
    tok = processor.tokenizer
    dialog = [("<image> say\nred", "red"), ("<image> again\nred", "red"), ("once more\nred", "red")]
    batch = family.training_batch(processor, [two_images()], [dialog])
    labels, image = batch["labels"][0], batch["input_ids"][0] == image_token_id(processor)
    end = tok.convert_tokens_to_ids(family.END_OF_TURN)
    assert labelled_spans(labels) == [tok("red", add_special_tokens=False)["input_ids"] + [end]] * 3
    starts = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
    # image tokens before each answer: the first image's, both, both
    seen = [image[:start].sum().item() for start in starts]
    assert seen[0] > 0 and seen[1] > seen[0] and seen[2] == seen[1] == image.sum().item()
