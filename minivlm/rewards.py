"""Rewards a program checks, for GRPO (objectives/grpo.py).

A reward function takes the prompts, the completions and the dataset rows they answer (one of
each per completion: a prompt's G completions repeat its prompt and row) and returns one float
per completion, as TRL's reward functions do. Built in:

    exact_match   1 if the completion equals one of the row's references after the VQA
                  normalisation (metrics.vqa_normalize: case, punctuation, articles, number words)
    metric        data.metric of the completion alone against the row's references
    format        1 if the whole completion matches a regular expression, else 0
    length        DAPO's overlong penalty (Yu et al. 2025, eq. 13): 0 up to max_new_tokens −
                  cache tokens, then falling linearly to −1 at max_new_tokens

and a user's own, named "module:function" (imported with the working directory on sys.path).
Several combine as a weighted sum (Rewards). One that raises, or returns anything but a finite
number per completion, stops the run with one message naming the function and the row.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from minivlm.config import Config, ConfigError, DataConfig
from minivlm.data import references_of
from minivlm.metrics import METRICS, vqa_normalize

RewardFunction = Callable[[list[str], list[str], list[dict]], list[float]]


def exact_match(cfg: DataConfig) -> RewardFunction:
    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [float(vqa_normalize(c) in {vqa_normalize(r) for r in references_of(cfg, row)})
                for c, row in zip(completions, rows)]
    return reward


def metric(cfg: DataConfig) -> RewardFunction:
    if cfg.metric not in METRICS:  # clip_score reads images, which a reward is not given
        raise ConfigError(f"data.metric = {cfg.metric!r} cannot be a reward: it scores against the image, not "
                          f"references; use one of {sorted(METRICS)}")
    score = METRICS[cfg.metric]

    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [score([c], [references_of(cfg, row)]) for c, row in zip(completions, rows)]
    return reward


def format_match(pattern: str) -> RewardFunction:
    compiled = re.compile(pattern, re.S)

    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
    return reward


def overlong(count_tokens: Callable[[str], int], max_new_tokens: int, cache: int) -> RewardFunction:
    """DAPO's soft overlong punishment: completions near the length limit lose reward, the more
    the closer, rather than all of them being cut off at it and judged on a truncated answer."""
    free = max_new_tokens - cache

    def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        lengths = [count_tokens(c) for c in completions]
        return [0.0 if n <= free else max(-1.0, (free - n) / cache) for n in lengths]
    return reward


def user_function(name: str) -> RewardFunction:
    """"module:function", a user's reward, imported as `python -c 'import module'` would from
    the working directory."""
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ConfigError(f"reward {name!r}: a user's reward is named module:function, e.g. my_rewards:counted")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward {name!r} cannot be loaded: {type(e).__name__}: {e}; put {module}.py in the "
                          "working directory (or on PYTHONPATH) with a function "
                          f"{function}(prompts, completions, rows) -> list[float]") from None
    if not callable(found):
        raise ConfigError(f"reward {name!r}: {module}.{function} is a {type(found).__name__}, not a function")
    return found


def _first_failure(function: RewardFunction, prompts: list[str], completions: list[str],
                   rows: list[dict]) -> tuple[int, Exception] | None:
    """The first completion `function` raises on when called on each alone, and what it raised:
    a batch call that failed names no row."""
    for k in range(len(completions)):
        try:
            function(prompts[k:k + 1], completions[k:k + 1], rows[k:k + 1])
        except Exception as e:  # noqa: BLE001
            return k, e
    return None


class RewardError(ConfigError):
    """A reward function that raised or returned something other than a finite number per completion."""


class Rewards:
    """Named reward functions and their weights: called on a batch of completions, the weighted
    sum of their rewards (the one GRPO's advantages are taken of) and each function's, to log."""

    def __init__(self, functions: dict[str, RewardFunction], weights: list[float] | None = None):
        weights = [1.0] * len(functions) if weights is None else weights
        if len(weights) != len(functions):
            raise ConfigError(f"{len(weights)} reward weights for {len(functions)} rewards ({', '.join(functions)}); "
                              "give one weight per reward")
        self.functions, self.weights = functions, weights

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict],
                 row_numbers: list[int]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """(the weighted sum per completion, each function's rewards); `row_numbers` name the
        rows in a message about a reward that failed."""
        each = {name: self._checked(name, f, prompts, completions, rows, row_numbers)
                for name, f in self.functions.items()}
        total = sum(w * torch.tensor(each[name], dtype=torch.float64) for name, w in zip(each, self.weights))
        return total, each

    @staticmethod
    def _checked(name: str, function: RewardFunction, prompts: list[str], completions: list[str], rows: list[dict],
                 row_numbers: list[int]) -> list[float]:
        try:
            values = list(function(prompts, completions, rows))
        except Exception as e:  # noqa: BLE001 (a user's code: any exception is the user's to see, in one line)
            k, e = _first_failure(function, prompts, completions, rows) or (None, e)
            where = f" on row {row_numbers[k]} (completion {completions[k]!r})" if k is not None else ""
            raise RewardError(f"reward {name} raised {type(e).__name__}: {e}{where}; fix the function") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {name} returned {len(values)} values for {len(completions)} completions; it "
                              "must return one float per completion")
        numbers = []
        for k, value in enumerate(values):
            try:
                number = float(value)  # a bool, a NumPy or a 0-d torch number reads as one
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise RewardError(f"reward {name} returned {value!r} on row {row_numbers[k]} (completion "
                                  f"{completions[k]!r}): it must return a finite number per completion; fix the "
                                  "function")
            numbers.append(number)
        return numbers


def build_rewards(cfg: Config, tokenizer) -> Rewards:
    """grpo.rewards as functions (a built-in's name, or a user's module:function), weighted by
    grpo.reward_weights; `tokenizer` counts a completion's tokens for the length reward."""
    g = cfg.grpo
    built_in = {"exact_match": lambda: exact_match(cfg.data), "metric": lambda: metric(cfg.data),
                "format": lambda: format_match(g.format_pattern),
                "length": lambda: overlong(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                                           g.max_new_tokens, g.overlong_cache)}
    # A user's is logged under its function's name (reward_<name>), a built-in's under its own.
    functions = {name.rpartition(":")[2]: built_in[name]() if name in built_in else user_function(name)
                 for name in g.rewards}
    return Rewards(functions, g.reward_weights or None)
