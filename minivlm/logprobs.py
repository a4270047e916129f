"""log π(y_t | x, y_<t) of the answer tokens, without a vocabulary-sized tensor kept for backward.

Every objective needs the log-probabilities of the tokens it learns, at the positions that predict
them: SFT sums their negatives, DPO sums them per row, GRPO takes them token by token. From full
logits that is an (n, V) tensor for n answer tokens and a V-word vocabulary, whose fp32 copy
logsumexp keeps for backward (4 bytes a logit), and backward adds its gradient and that
gradient's input. GRPO's 8 completions of 256 tokens over Qwen's 151,936 words: 1.2 GB kept by
one micro-batch. bench/logprobs.py measured the whole peak at about 16 bytes a logit on the CPU
(8244 MiB for 2,056 answer tokens × PaliGemma's 257,152 words).

With train.logits_chunk = c, the model stops before its lm_head (`final_hidden_states`: the
(n, H) hidden states at those positions, H ≪ V), and the lm_head and the log-softmax run on c
rows at a time, each chunk under activation checkpointing:

    for each chunk h_i (c × H) of h, with targets y_i:
        z_i = lm_head(h_i)                       c × V, in autocast's dtype, then fp32
        z_i = cap · tanh(z_i / cap)              where the model caps its logits (Gemma 2)
        log π(y_i) = z_i[y_i] − logsumexp(z_i)   c numbers kept; z_i dropped
    backward: z_i computed again, one chunk at a time

Kept for backward: h and the targets. Alive at once: one chunk's logits and their gradient,
whatever n is (1216 MiB at c = 256 in that bench). The price is the lm_head's forward run twice on the
answer rows (a small matmul next to the decoder's). c = 0 takes the full logits
(precision.logits_of), as does FSDP, under which the lm_head's weight exists only inside the
model's forward. tests/test_logprobs.py: values and gradients equal the full computation, for
every family; bench/logprobs.py measures the memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minivlm.build import Built
from minivlm.config import Config
from minivlm.modules import replace_module
from minivlm.packing import pack
from minivlm.precision import autocast, logits_of


class HiddenTap(nn.Module):
    """Stands in for the lm_head during one forward: keeps its input, the final hidden states at
    the kept positions, and returns logits of width 0, which whatever the model does after its
    lm_head (a softcap, a cast) passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :0]


@contextlib.contextmanager
def final_hidden_states(model: nn.Module) -> Iterator[tuple[HiddenTap, nn.Module]]:
    """Within: the model's lm_head is a HiddenTap. Yields (the tap, the lm_head), and puts the
    lm_head back however the block ends. Every family's output layer is named lm_head."""
    name = next(n for n, _ in model.named_modules() if n.rpartition(".")[2] == "lm_head")
    head, tap = model.get_submodule(name), HiddenTap()
    replace_module(model, name, tap)
    try:
        yield tap, head
    finally:
        replace_module(model, name, head)


def log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V) logits, (...) ids -> (...) fp32 log π(id): the chosen logit minus the log-sum-exp,
    without a (..., V) log-softmax in memory."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def chunk_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    softcap: float | None) -> torch.Tensor:
    """(c, H) hidden states -> (c,) fp32 log π(target), through the lm_head (and its softcap)."""
    z = head(hidden).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return log_probs(z, targets)


def logits_chunk(cfg: Config) -> int:
    """Answer rows through the lm_head at a time: train.logits_chunk, or 0 (all at once, the
    model's own logits) under FSDP, where the lm_head's weight exists only inside the forward."""
    return 0 if cfg.train.fsdp else cfg.train.logits_chunk


def answer_log_probs(cfg: Config, built: Built, batch: dict[str, torch.Tensor], at: torch.Tensor,
                     targets: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """(n,) fp32 log π(target) at the n positions `at` marks ((batch, seq) bool), in row-major
    order, the order of `targets`. `model`: the module to call, if not built.model (its
    DistributedDataParallel wrapper in training). With data.packing the rows are joined first
    (packing.py): `at` must mark real tokens only, as SFT's and DPO's answer positions do."""
    targets = targets.to(built.device)
    if cfg.data.packing:  # the rows end to end, unpadded (packing.py); `at` marks real tokens only
        at = at[batch["attention_mask"].bool().to(at.device)][None]
        batch = pack(built, batch)
    chunk = logits_chunk(cfg)
    if not chunk:
        return log_probs(logits_of(cfg, built, batch, at=at, model=model), targets)
    with final_hidden_states(built.model) as (tap, head):
        logits_of(cfg, built, batch, at=at, model=model)
    softcap = getattr(built.model.config.get_text_config(), "final_logit_softcapping", None)
    with autocast(cfg, built.device):
        chunks = [checkpoint(chunk_log_probs, head, tap.hidden[i:i + chunk], targets[i:i + chunk], softcap,
                             use_reentrant=False) for i in range(0, len(targets), chunk)]
    # No answer token: an empty result still tied to the graph, so that backward runs as with logits.
    return torch.cat(chunks) if chunks else tap.hidden.float().sum(-1)
