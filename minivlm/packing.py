"""Padding-free micro-batches (data.packing): a micro-batch's samples end to end in one row.

A padded micro-batch of b samples is a (b, L_max) tensor: every row as long as its longest,
the pad positions run through every layer and thrown away. Where images are of varied sizes
(Qwen-VL's dynamic resolution: 4 to 16,384 tokens an image) most of a batch can be padding.
Packed, the same samples are one row of Σ L_i tokens, nothing padded (TRL's padding_free):

    padded                        packed
    [a a a a a . . .]             [a a a a a b b c c c c c c c c]
    [b b . . . . . .]             positions (restarted per sample):
    [c c c c c c c c]             [0 1 2 3 4 0 1 0 1 2 3 4 5 6 7]

The model tells the samples apart by their positions alone: with no attention mask, transformers
reads a restart of `position_ids` as a new sequence (masking_utils.find_packed_sequence_indices)
and lets each token attend within its own sample only, a block-diagonal causal mask; rotary
positions restart too. So each sample's hidden states, and so its loss, are those of its padded
row (tests/test_packing.py: equal values and gradients). Labels need nothing: the one position
between two samples, the last of a sample, predicts the next sample's first token, a prompt
token whose label is -100.

Qwen-VL's M-RoPE gives image tokens (time, row, column) positions that do not simply count up,
so the restarts cannot be read from them: the family computes them per sample
(`rope_positions`, from its padded rows), and transformers takes a 4-row `position_ids`, the
plain per-sample count first (for the mask) and the three M-RoPE rows after it.

PaliGemma's bidirectional prefix and Gemma 3's bidirectional images pack too: transformers
intersects their patterns with the per-sample blocks. Families whose images enter by
cross-attention (Mllama, IDEFICS) keep PACKING = False: an image mask per row, which a joined
row cannot carry.

The attention is still computed over the whole row: an SDPA kernel given a block-diagonal mask
costs (Σ L_i)² where the padded batch cost b · L_max². Only a varlen kernel (flash-attention's,
which transformers feeds the same positions) skips the blocks; bench/packing.py measures both
sides of that on the CPU.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from minivlm.config import Config, ConfigError
from minivlm.models import FAMILIES, get_family

if TYPE_CHECKING:  # build.py checks the config against the family here (check), before building
    from minivlm.build import Built

# Per-token tensors, (rows, seq) like input_ids: packed with it. The rest (the images' tensors)
# are per image, not per row, and pass through as they are.
TOKEN_KEYS = ("input_ids", "labels", "token_type_ids", "mm_token_type_ids")


def check(family: ModuleType, cfg: Config) -> None:
    """Refuse data.packing for a family whose samples cannot share a row (PACKING = False)."""
    if cfg.data.packing and not family.PACKING:
        able = [name for name in FAMILIES if get_family(name).PACKING]
        raise ConfigError(f"data.packing: {family.NAME}'s images enter by cross-attention, a mask per row, so its "
                          f"samples cannot share one; set data.packing = false (packing works with {', '.join(able)})")


def pack(built: Built, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded (rows, seq) `batch` as one row of its real tokens, with position_ids restarted
    per sample and no attention_mask (see the module docstring)."""
    keep = batch["attention_mask"].bool()
    counted = keep.long().cumsum(1) - 1  # each sample's own 0, 1, 2, ... whichever side it is padded on
    packed = {key: value[keep][None] for key, value in batch.items() if key in TOKEN_KEYS}
    positions = counted[keep][None]
    rope = getattr(built.family, "rope_positions", None)
    if rope is not None:  # M-RoPE: (3, rows, seq) -> (3, 1, n), the plain count on top
        positions = torch.cat([positions[None], rope(built.model, batch)[:, keep][:, None]])
    rest = {key: value for key, value in batch.items() if key not in TOKEN_KEYS and key != "attention_mask"}
    return {**rest, **packed, "position_ids": positions}
