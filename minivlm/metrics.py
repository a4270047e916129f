"""Scoring answers against references: the metrics the seed recipes report.

    accuracy           exact match after light normalisation, against any reference (the demo)
    vqa_accuracy       VQAv2: min(#humans who gave the answer / 3, 1), averaged over 10-choose-9 subsets
    anls               DocVQA: average normalised Levenshtein similarity, threshold 0.5
    relaxed_accuracy   ChartQA: numbers within 5% count as right
    bleu4              corpus BLEU with 4-grams and the brevity penalty (Papineni et al. 2002)
    cider_d            consensus of TF-IDF n-grams with clipping and a length penalty (Vedantam et al. 2015)
    clip_score         CLIPScore: how well CLIP matches caption and image, no references (Hessel et al. 2021)

Each but clip_score takes `predictions: list[str]` and `references: list[list[str]]` (one or more
per prediction) and returns one float; clip_score reads the images instead of references.

BLEU-4 and CIDEr-D see a caption as its lower-cased runs of letters and digits, of any script.
coco-caption, whose numbers papers quote, first runs the PTB tokenizer, which lower-cases and drops
punctuation too (but splits "don't" into "do n't"): on lower-cased, punctuation-free text the two
tokenise alike, and our CIDEr-D equals its scorer's.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel, ProcessorMixin


def normalize(answer: str) -> str:
    """Lower-case, strip punctuation and surrounding/repeated whitespace."""
    answer = answer.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", answer).strip()


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Fraction of predictions equal to one of their references after `normalize`."""
    _check(predictions, references)
    return sum(normalize(p) in {normalize(r) for r in refs} for p, refs in zip(predictions, references)) / len(predictions)


# --- VQAv2 -------------------------------------------------------------------------------------

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# The VQA evaluation restores apostrophes people leave out ("dont" -> "don't"); these are its
# contractions, written once with their apostrophes.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she'd she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've twas wasn't we'd've we'd we'll we're we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _without_apostrophes(word: str) -> set[str]:
    """"couldn't've" -> {"couldntve", "couldnt've", "couldn'tve"}: every way to drop apostrophes."""
    positions = [i for i, c in enumerate(word) if c == "'"]
    forms = set()
    for mask in range(1, 2 ** len(positions)):
        drop = {p for k, p in enumerate(positions) if mask >> k & 1}
        forms.add("".join(c for i, c in enumerate(word) if i not in drop))
    return forms


_WORDS = {"well", "were", "wed", "shed", "hell", "shell", "ill", "id"}  # real words, left alone
_CONTRACTIONS = {bare: word for word in _CONTRACTED for bare in _without_apostrophes(word) if bare not in _WORDS}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]


def vqa_normalize(answer: str) -> str:
    """The VQAv2 answer normalisation: punctuation, periods, number words, articles, contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark next to a space, or any text with a "1,000"-style number, loses it;
    # otherwise it becomes a space ("black/white" -> "black white"). As in vqaEval.py, "next to a
    # space" is judged on the answer as given, not as earlier marks left it ("red/-blue-green").
    joined = re.search(r"\d,\d", text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or joined) else " ")
    # vqaEval.py's periodStrip, "(?!<=\d)(\.)(?!\d)", means a lookbehind but is written as a lookahead:
    # it strips every period not followed by a digit, so "2." -> "2" and "3.5." -> "3.5".
    out = re.sub(r"\.(?!\d)", "", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """VQAv2 accuracy. With 10 human answers: for each answer left out, min(matches among the other
    9 / 3, 1), averaged over the 10; so 4 or more matching humans give 1.0, 3 give 0.9, 2 give
    0.6 and 1 gives 0.3. With fewer answers the same formula runs over them; with one, it is
    exact match after normalisation.

    (The official script skips normalisation when all ten humans agree; here it always applies.)
    """
    _check(predictions, references)
    total = 0.0
    for prediction, answers in zip(predictions, references):
        pred = vqa_normalize(prediction)
        gts = [vqa_normalize(a) for a in answers]
        if len(gts) == 1:
            total += float(pred == gts[0])
            continue
        scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
        total += sum(scores) / len(scores)
    return total / len(predictions)


# --- ANLS ----------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(predictions: list[str], references: list[list[str]], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity (Biten et al. 2019): per question, the best over
    its answers of 1 - dist / max(len) (lower-cased, whitespace-normalised), 0 if that distance
    ratio is >= threshold. As the Robust Reading Competition's scorer (and the `anls` package
    made from it), the lengths are those of the upper-cased strings: "ß" counts as "SS"."""
    _check(predictions, references)

    def clean(s: str) -> str:
        return " ".join(s.lower().split())

    total = 0.0
    for prediction, answers in zip(predictions, references):
        p = clean(prediction)
        best = 0.0
        for answer in answers:
            a = clean(answer)
            ratio = levenshtein(p, a) / max(len(p.upper()), len(a.upper())) if (p or a) else 0.0
            best = max(best, 1 - ratio if ratio < threshold else 0.0)
        total += best
    return total / len(predictions)


# --- ChartQA -----------------------------------------------------------------------------------------

def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(predictions: list[str], references: list[list[str]], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Masry et al. 2022): a number within `tolerance` relative error of
    a reference is right ("12%" reads as 0.12); anything else must match exactly (case-insensitive)."""
    _check(predictions, references)

    def right(prediction: str, answer: str) -> bool:
        p, a = _number(prediction), _number(answer)
        if p is not None and a is not None:
            return p == a if a == 0 else abs(p - a) / abs(a) <= tolerance
        return prediction.strip().lower() == answer.strip().lower()

    return sum(any(right(p, a) for a in answers) for p, answers in zip(predictions, references)) / len(predictions)


# --- captions ------------------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    # \w, not [a-z0-9]: letters of any script, so "café niño" is two words, not "caf ni o" (the
    # underscore \w also takes hardly occurs in captions). NFC first, or a decomposed "ñ" (n + combining
    # tilde, not a word character) would cut "niño" in two.
    return re.findall(r"\w+", unicodedata.normalize("NFC", text).lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4: the geometric mean of clipped 1- to 4-gram precisions over the corpus, times
    the brevity penalty exp(1 - r/c) when the candidates are shorter (c) than the references
    (r: per sentence, the reference length closest to the candidate's, the shorter on a tie)."""
    _check(predictions, references)
    matched, possible = [0] * 4, [0] * 4
    c = r = 0
    for prediction, answers in zip(predictions, references):
        cand = _tokens(prediction)
        refs = [_tokens(a) for a in answers]
        c += len(cand)
        r += min((abs(len(x) - len(cand)), len(x)) for x in refs)[1]
        for n in range(1, 5):
            counts = _ngrams(cand, n)
            most = Counter()
            for ref in refs:
                most |= _ngrams(ref, n)  # per n-gram, the most any one reference has
            matched[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            possible[n - 1] += max(len(cand) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / 4
    brevity = 1.0 if c > r else math.exp(1 - r / c) if c else 0.0
    return brevity * math.exp(log_precision)


def cider_d(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption's scorer computes it: for n = 1..4, n-gram counts weighted by IDF over
    the reference sets, log(#images / max(1, #images whose references hold the n-gram)); the
    candidate's counts clipped to each reference's; cosine similarity times
    exp(-(len_c - len_r)² / 2σ²); averaged over references and n, times 10, then over images.
    Words as `_tokens` splits them (see the module docstring)."""
    _check(predictions, references)
    n_images = len(references)
    ref_tokens = [[_tokens(a) for a in answers] for answers in references]
    df = Counter()
    for refs in ref_tokens:
        df.update({g for ref in refs for n in range(1, 5) for g in _ngrams(ref, n)})

    def vectors(tokens: list[str]) -> list[dict]:
        # An n-gram in no reference weighs the most, log(#images), not 0: it adds to the candidate's
        # norm, so words no reference uses lower the cosine.
        return [{g: k * math.log(n_images / max(df[g], 1)) for g, k in _ngrams(tokens, n).items()}
                for n in range(1, 5)]

    def norm(v: dict) -> float:
        return math.sqrt(sum(x * x for x in v.values()))

    total = 0.0
    for prediction, refs in zip(predictions, ref_tokens):
        cand = _tokens(prediction)
        cand_vecs = vectors(cand)
        score = 0.0
        for ref in refs:
            # coco-caption measures length in bigrams (len - 1, and 0 for an empty caption): the same
            # difference as in words unless one side is empty, and then the cosine is 0 anyway.
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma ** 2))
            for vc, vr in zip(cand_vecs, vectors(ref)):
                denominator = norm(vc) * norm(vr)
                if denominator:
                    score += penalty * sum(min(x, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, x in vc.items()) / denominator
        total += 10 * score / (4 * len(refs))
    return total / n_images


# --- CLIPScore -----------------------------------------------------------------------------------------

CLIP_PREFIX = "A photo depicts "  # what the reference implementation (jmhessel/clipscore) puts before every caption


@functools.lru_cache(maxsize=1)
def _clip(name: str) -> tuple[CLIPModel, ProcessorMixin]:
    return CLIPModel.from_pretrained(name).eval(), AutoProcessor.from_pretrained(name)


@torch.no_grad()
def clip_scores(images: list[Image.Image], captions: list[str], clip_model: str,
                device: str | torch.device = "cpu") -> list[float]:
    """Per sample, CLIP-S(c, v) = w · max(cos(E_image(v), E_text(c)), 0) with w = 2.5 (Hessel et al.
    2021, eq. 1; w only rescales), the text being "A photo depicts <c>" cut to CLIP's context length.
    The corpus score is their mean."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"{len(captions)} captions for {len(images)} images; need as many, and at least one")
    model, processor = _clip(clip_model)
    model.to(device)
    inputs = processor(text=[CLIP_PREFIX + c for c in captions], images=images, return_tensors="pt", padding=True,
                       truncation=True, max_length=model.config.text_config.max_position_embeddings).to(device)
    image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    return (2.5 * F.cosine_similarity(image, text, dim=-1).clamp(min=0)).tolist()


METRICS = {"accuracy": accuracy, "vqa_accuracy": vqa_accuracy, "anls": anls, "relaxed_accuracy": relaxed_accuracy,
           "bleu4": bleu4, "cider_d": cider_d}
