"""Metrics against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import pytest

from minivlm.metrics import accuracy, anls, bleu4, cider_d, levenshtein, relaxed_accuracy, vqa_accuracy, vqa_normalize


@pytest.mark.parametrize("raw, normalized", [
    ("The Dog.", "dog"),
    ("two", "2"), ("None", "0"),
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("well", "well"),
    ("black/white", "black white"),           # a mark between words becomes a space
    ("yes !", "yes"),                         # a mark next to a space disappears
    ("1,000", "1000"), ("3.5", "3.5"),        # thousands separator gone, decimal point kept
    ("  an\tapple \n", "apple"),
])
def test_vqa_normalize(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_vqa_accuracy_counts_humans():
    ten = lambda k: ["red"] * k + ["blue"] * (10 - k)  # noqa: E731
    # k humans agree: left-out ones that agree see k-1 others, the rest see k; min(x/3, 1), averaged.
    assert vqa_accuracy(["red"], [ten(1)]) == pytest.approx(0.3)   # (1·0 + 9·1/3) / 10
    assert vqa_accuracy(["red"], [ten(2)]) == pytest.approx(0.6)   # (2·1/3 + 8·2/3) / 10
    assert vqa_accuracy(["red"], [ten(3)]) == pytest.approx(0.9)   # (3·2/3 + 7·1) / 10
    assert vqa_accuracy(["red"], [ten(4)]) == pytest.approx(1.0)
    assert vqa_accuracy(["green"], [ten(4)]) == 0.0
    assert vqa_accuracy(["Two."], [["2"]]) == 1.0                  # one answer: exact match, normalised
    assert vqa_accuracy(["", "the cat"], [["cat"], ["cat"]]) == 0.5  # an empty prediction scores 0


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert anls(["hallo"], [["hello"]]) == pytest.approx(0.8)               # 1 - 1/5
    assert anls(["  Hello   World"], [["hello world"]]) == 1.0
    assert anls(["abcd"], [["abxy"]]) == 0.0                                # 2/4 = 0.5 is not < 0.5
    assert anls(["abcd"], [["abxy", "abcx"]]) == pytest.approx(0.75)        # best reference counts
    assert anls([""], [["abc"]]) == 0.0
    assert anls(["", "x"], [[""], ["x"]]) == 1.0


def test_relaxed_accuracy():
    assert relaxed_accuracy(["10.4", "10.6"], [["10"], ["10"]]) == 0.5     # 4% in, 6% out
    assert relaxed_accuracy(["12%"], [["0.12"]]) == 1.0
    assert relaxed_accuracy(["1,000"], [["1000"]]) == 1.0
    assert relaxed_accuracy(["0.01"], [["0"]]) == 0.0                       # zero must be exact
    assert relaxed_accuracy(["Yes"], [["yes"]]) == 1.0
    assert relaxed_accuracy(["yes"], [["no", "yes"]]) == 1.0


def test_bleu4():
    assert bleu4(["a dog runs in the park"], [["a dog runs in the park"]]) == pytest.approx(1.0)
    # Corpus counts: 1-grams 11/12, 2-grams 8/10, 3-grams 5/8, 4-grams 3/6; lengths equal, so no penalty.
    score = bleu4(["the cat sat on the mat", "a dog runs in the park"],
                  [["the cat is on the mat"], ["a dog runs in the park"]])
    assert score == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25)
    # All precisions 1, but 10 candidate words against 12 reference words: exp(1 - 12/10).
    short = bleu4(["a dog runs in the park", "the cat sat on"],
                  [["a dog runs in the park"], ["the cat sat on the mat"]])
    assert short == pytest.approx(math.exp(-0.2))
    # Of references 4 and 8 long, a 6-word candidate is measured against the shorter: no penalty.
    assert bleu4(["w x y z u v"], [["w x y z", "a b c d e f g h"]]) == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert bleu4([""], [["a b c d"]]) == 0.0


def test_cider_d():
    refs = [["a red circle"], ["a blue square"]]
    # "a" is in both images' references: IDF log(2/2) = 0. Every other n-gram: log 2.
    # Image 1 identical to its reference: cosine 1 for n = 1, 2, 3, nothing for n = 4 -> 10·3/4.
    # Image 2 shares no weighted n-gram -> 0. Mean: 3.75.
    assert cider_d(["a red circle", "a green triangle"], refs) == pytest.approx(3.75)
    # "red circle" vs "a red circle": n=1 cosine 1, n=2 {red circle} vs {a red, red circle}: 1/√2,
    # n=3 none; length differs by 1: exp(-1/72).
    partial = cider_d(["red circle", "a blue square"], refs)
    assert partial == pytest.approx((10 * math.exp(-1 / 72) * (1 + 1 / math.sqrt(2)) / 4 + 7.5) / 2)
    # Clipping: repeating a word cannot earn more than the reference holds.
    assert cider_d(["red red red circle", "a blue square"], refs) < cider_d(["red circle", "a blue square"], refs)


def test_accuracy_and_shape_errors():
    assert accuracy(["Red.", "blue"], [["red"], ["green", "cyan"]]) == 0.5
    assert accuracy(["cyan"], [["green", "Cyan!"]]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"]])
