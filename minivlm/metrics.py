"""Scoring answers against references."""

from __future__ import annotations

import re
import string


def normalize(answer: str) -> str:
    """Lower-case, strip punctuation and surrounding/repeated whitespace."""
    answer = answer.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", answer).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)
