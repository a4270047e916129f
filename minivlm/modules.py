"""Finding modules by name and swapping them in place: what quantization and LoRA injection share."""

from __future__ import annotations

import re

from torch import nn


def matches(name: str, pattern: str, anywhere: bool) -> bool:
    """Does the dotted module `name` match `pattern`?

    "re:<regex>" is a full match against the whole name. Otherwise the pattern is a dotted
    path of whole components: at the end of `name` (anywhere=False, as PEFT's target_modules)
    or anywhere in it (anywhere=True: "vision_tower" covers every module inside it).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if anywhere:
        return f".{pattern}." in f".{name}."
    return name == pattern or name.endswith("." + pattern)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """model.<name> = new, for a dotted `name` such as "language_model.layers.0.self_attn.q_proj"."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
