"""Metrics against values worked out by hand from their definitions, VQA accuracy against the values
of the official vqaEval.py, ANLS against the `anls` package (the Robust Reading Competition's
scorer), CIDEr-D against coco-caption's scorer, CLIPScore against CLIP's own forward pass."""

from __future__ import annotations

import math
import string

import pytest
import torch
from anls import anls_score
from PIL import Image
from pycocoevalcap.cider.cider import Cider
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from conftest import tiny_config
from minivlm.build import build
from minivlm.config import validate
from minivlm.data import images_of, load_split, rows_of
from minivlm.evaluate import evaluate
from minivlm.metrics import (_tokens, accuracy, anls, bleu4, cider_d, clip_scores, levenshtein,
                             relaxed_accuracy, vqa_accuracy, vqa_normalize)


@pytest.mark.parametrize("raw, normalized", [
    ("The Dog.", "dog"),
    ("two", "2"), ("None", "0"),
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("well", "well"),
    ("black/white", "black white"),           # a mark between words becomes a space
    ("yes !", "yes"),                         # a mark next to a space disappears
    ("1,000", "1000"), ("3.5", "3.5"),        # thousands separator gone, decimal point kept
    ("2.", "2"), ("10.", "10"), ("3.5.", "3.5"),  # a period not followed by a digit goes, even after one
    ("red/-blue-green", "red blue green"),    # "-" is next to no space in the answer as given
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


# (prediction, the ten human answers, what the official scorer gives): GT-Vision-Lab/VQA's
# PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00 (its two print statements made Python 3),
# run on these questions; the values are its per-question accuracy before rounding.
OFFICIAL_VQA = [
    ("Two", ["2"] * 2 + ["3"] * 8, 0.6),
    ("a dog", ["dog"] * 3 + ["puppy"] * 7, 0.9),
    ("dont know", ["don't know"] + ["no"] * 9, 0.3),
    ("black/white", ["black white"] * 4 + ["gray"] * 6, 1.0),
    ("red, blue", ["red blue"] * 2 + ["purple"] * 8, 0.6),
    ("3.5.", ["3.5"] * 5 + ["4"] * 5, 1.0),
    ("None", ["0"] + ["1"] * 9, 0.3),
    ("Couldnt've", ["couldn't've"] * 5 + ["maybe"] * 5, 1.0),
    ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9),
    ("The Yes!", ["yes"] * 9 + ["no"], 1.0),
    ("no", ["yes"] * 9 + ["no"], 0.3),
    ("red/-blue-green", ["red blue green"] * 6 + ["red"] * 4, 1.0),
    ("  an\tapple \n", ["apple"] * 2 + ["orange"] * 8, 0.6),
    ("yes", ["yes"] * 10, 1.0),
]


def test_vqa_accuracy_equals_the_official_scorer():
    for prediction, humans, official in OFFICIAL_VQA:
        assert vqa_accuracy([prediction], [humans]) == pytest.approx(official, abs=1e-12), prediction
    predictions, humans, official = zip(*OFFICIAL_VQA)
    assert vqa_accuracy(list(predictions), list(humans)) == pytest.approx(sum(official) / len(official))
    # Where we differ, on purpose: when all ten humans agree, vqaEval.py normalises neither side
    # and gives "Yes." 0.0 against ten "yes"; we normalise always (see vqa_accuracy).
    assert vqa_accuracy(["Yes."], [["yes"] * 10]) == 1.0


def test_anls_equals_the_robust_reading_scorer():
    """The `anls` package (shunk031/ANLS, made from the Robust Reading Competition's script) as the
    oracle: DocVQA-like answers, the threshold's edge, case and spaces, "ß" (longer upper-cased),
    and 300 random pairs over a small alphabet, where distances near the threshold are common."""
    import random
    cases = [("Denver Broncos", ["Denver Broncos", "Denver R. Broncos"]), ("12/15/89", ["12/15/88"]),
             ("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]), ("abcd", ["abxy"]), ("abcd", ["abxy", "abcx"]),
             ("  Hello   World", ["hello world"]), ("aßß", ["ass"]), ("", ["abc"]), ("", [""]), ("x", [""]),
             ("1,250", ["1250", "$1,250"]), ("pm", ["p.m."])]
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abc ") for _ in range(rng.randint(0, 6)))  # noqa: E731
    cases += [(word(), [word() for _ in range(rng.randint(1, 3))]) for _ in range(300)]
    for prediction, answers in cases:
        assert anls([prediction], [answers]) == pytest.approx(anls_score(prediction, answers), abs=1e-12), \
            (prediction, answers)
    predictions, answers = zip(*cases)
    expected = sum(anls_score(p, a) for p, a in cases) / len(cases)
    assert anls(list(predictions), list(answers)) == pytest.approx(expected, abs=1e-12)


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
    assert relaxed_accuracy(["10.5", "9.5"], [["10"], ["10"]]) == 1.0      # 5% is in (ChartQA: <= 5%)
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
    # "café" is one word, not "caf": against "un café con leche y pan", "un caf con leche y pan" matches
    # 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3.
    assert bleu4(["un caf con leche y pan"], [["un café con leche y pan"]]) == pytest.approx(
        (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_tokens_keep_letters_of_any_script():
    assert _tokens("Café niño!") == ["café", "niño"]
    assert _tokens("nin\u0303o") == ["niño"]  # n + combining tilde, composed first


def test_cider_d():
    refs = [["a red circle"], ["a blue square"]]
    # "a" is in both images' references: IDF log(2/2) = 0. Every other n-gram: log 2, including those
    # of "green triangle", which no reference holds (document frequency counted as 1).
    # Image 1 identical to its reference: cosine 1 for n = 1, 2, 3, nothing for n = 4 -> 10·3/4.
    # Image 2 shares no weighted n-gram -> 0. Mean: 3.75.
    assert cider_d(["a red circle", "a green triangle"], refs) == pytest.approx(3.75)
    # "red circle" vs "a red circle": n=1 cosine 1, n=2 {red circle} vs {a red, red circle}: 1/√2,
    # n=3 none; length differs by 1: exp(-1/72).
    partial = cider_d(["red circle", "a blue square"], refs)
    assert partial == pytest.approx((10 * math.exp(-1 / 72) * (1 + 1 / math.sqrt(2)) / 4 + 7.5) / 2)
    # An n-gram no reference holds weighs log 2 too, so it lengthens the candidate's vector:
    # "red circle green" vs "a red circle", every weight log 2 except "a" (0), equal lengths:
    # n=1 {red, circle} shared, 2 / (√3·√2); n=2 {red circle} shared, 1 / (√2·√2); n=3 none.
    unseen = cider_d(["red circle green", "a blue square"], refs)
    assert unseen == pytest.approx((10 * (2 / math.sqrt(6) + 1 / 2) / 4 + 7.5) / 2)
    # Clipping: repeating a word cannot earn more than the reference holds.
    assert cider_d(["red red red circle", "a blue square"], refs) < cider_d(["red circle", "a blue square"], refs)


# Lower-cased, space-separated and punctuation-free, so coco-caption's str.split() and our _tokens agree.
CORPUS = [
    ("a man riding a horse", ["a man riding a horse on the beach", "a person rides a brown horse",
                              "horse and rider by the sea"]),
    ("", ["two dogs play in the snow", "dogs running through snow",
          "a pair of dogs playing outside in the cold white snow"]),
    ("bus", ["a red bus on a city street", "a double decker bus", "red bus"]),
    ("broccoli broccoli broccoli broccoli", ["a plate of food with broccoli", "broccoli and rice on a white plate",
                                             "a healthy meal"]),
    ("una taza de café con leche", ["un café con leche en la mesa", "una taza de café",
                                    "café y pan en una mesa de madera"]),
    ("un niño juega al fútbol en el jardín", ["el niño juega con una pelota", "un niño pequeño en el parque",
                                              "niño jugando al fútbol"]),
    ("a zebra grazing in a field", ["a cat sleeping on a laptop keyboard", "cat on a computer", "cat"]),
    ("a kitchen kitchen with with cabinets", ["a kitchen with wooden cabinets", "an empty kitchen",
                                              "kitchen with a stove and a sink and white cabinets"]),
    ("train", ["people standing at a train station", "a train arriving at the station platform",
               "commuters waiting for the train"]),
    ("a man on a horse", ["a man riding a horse", "a man on a horse"]),
    ("a boat on the lake at sunset", ["a small boat on a lake"]),
]


def test_cider_d_equals_coco_caption():
    predictions, references = [c for c, _ in CORPUS], [r for _, r in CORPUS]
    expected, _ = Cider().compute_score({i: r for i, r in enumerate(references)},
                                        {i: [c] for i, c in enumerate(predictions)})
    assert cider_d(predictions, references) == pytest.approx(expected, abs=1e-6)


# --- CLIPScore -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory) -> tuple[str, str]:
    """A random-weight CLIP with a character-level CLIP tokenizer, saved like a hub checkpoint; and
    the same CLIP with its text projection negated, which flips the sign of every cosine."""
    chars = string.ascii_lowercase + string.digits
    # No merges: CLIP's BPE splits every word into characters, the last one marked "</w>".
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)},
             **{c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)}}
    processor = CLIPProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              CLIPTokenizer(vocab=vocab, merges=[]))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)
    paths = []
    for name in ("clip", "clip-negated"):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths.append(str(path))
        with torch.no_grad():
            model.text_projection.weight.neg_()
    return paths[0], paths[1]


def clip_s_by_hand(path: str, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
    """2.5 · max(cos, 0) from the unit-length embeddings of CLIP's own forward pass."""
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    inputs = processor(text=["A photo depicts " + c for c in captions], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return 2.5 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)


def noise_images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (30 + 4 * i, 40, 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(n)]


def test_clip_score_is_hessel_et_al(tiny_clips):
    path, negated = tiny_clips
    images, captions = noise_images(4), ["a red circle", "blue square", "", "a green triangle top left"]
    torch.testing.assert_close(torch.tensor(clip_scores(images, captions, path)), clip_s_by_hand(path, images, captions),
                               rtol=0, atol=1e-5)
    # The same pairs with every cosine's sign flipped: in each, one side is clamped to 0, the other is not.
    for a, b in zip(clip_scores(images, captions, path), clip_scores(images, captions, negated)):
        assert min(a, b) == 0 and max(a, b) > 0
    # Longer than CLIP's 64 positions: cut, not an error; past the cut, the words no longer count.
    long = clip_scores([images[0]] * 2, ["red " * 40, "red " * 40 + "blue"], path)
    assert long[0] == pytest.approx(long[1])
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        clip_scores(images[:1], captions[:2], path)


def test_evaluate_scores_clip_score_batch_by_batch(tiny_paligemma, shapes_data, tiny_clips, tmp_path, monkeypatch):
    from minivlm import evaluate as evaluate_module

    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path / "run")
    cfg.data.metric, cfg.data.clip_model = "clip_score", tiny_clips[0]
    validate(cfg)
    ds = load_split(cfg.data, cfg.data.eval_split)
    batches = []
    real = evaluate_module.clip_scores
    monkeypatch.setattr(evaluate_module, "clip_scores", lambda images, *a: batches.append(len(images)) or real(images, *a))
    scored = evaluate(cfg, build(cfg), ds, batch_size=3)
    assert batches == [3, 3, 2]  # scored batch by batch: the split's images are never all in memory
    images = [images_of(cfg.data, row)[0] for row in rows_of(ds, list(range(len(ds))))]
    expected = clip_s_by_hand(tiny_clips[0], images, scored["predictions"]).mean().item()
    assert scored["score"] == pytest.approx(expected, abs=1e-5)
    assert set(scored) == {"metric", "score", "n", "prompts", "predictions", "references", "rows"}
    assert scored["metric"] == "clip_score" and scored["n"] == len(scored["references"]) == len(ds) == 8


def test_accuracy_and_shape_errors():
    assert accuracy(["Red.", "blue"], [["red"], ["green", "cyan"]]) == 0.5
    assert accuracy(["cyan"], [["green", "Cyan!"]]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"]])

