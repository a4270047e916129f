"""Supervised fine-tuning: learn the answers, the loss taken on answer tokens only.

One optimizer step = `grad_accum` micro-batches. The loss of the step is

    L = Σ_micro Σ_answer-tokens  -log p(token)   /   N_answer-tokens(all micro-batches)

so every answer token weighs the same however the tokens fall into micro-batches:
batch 4 × accum 1 and batch 1 × accum 4 give the same gradient. (Averaging each micro-batch's
mean loss instead would over-weight the tokens of short answers.) Under torchrun the sums run
over every rank's micro-batches too: the answer tokens are counted across ranks before dividing,
and DDP sums the ranks' gradients, so N ranks × batch b give the same gradient as one process
with batch N·b.
"""

from __future__ import annotations

import datasets
import torch

from minivlm import distributed
from minivlm.batches import answer_positions, answer_targets, collate
from minivlm.build import Built
from minivlm.config import Config
from minivlm.logprobs import answer_log_probs

COUNT = "answer_tokens"
EXTRA_FORWARDS = 0
PLOTTED = None  # data.metric
CURVE = ("loss", "val_loss")
SHARES = ()


def setup(cfg: Config, built: Built) -> None:
    """SFT needs nothing besides the model."""
    return None


def iterations(cfg: Config) -> int:
    return 1


def planned(cfg: Config) -> dict:
    return {}


def answer_loss_sum(cfg: Config, built: Built, batch: dict[str, torch.Tensor],
                    model: torch.nn.Module | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (labels != -100), in fp32.

    Position t predicts token t+1, so the positions that carry loss are those whose *next* label
    is set. Only they go through the lm_head: a PaliGemma sample is 256 image tokens, a prompt
    and a few answer tokens, and full logits would be a (batch, seq, 257152) tensor, kept for
    backward, of which all but the answer rows are thrown away. Here the lm_head sees the n
    answer positions only, train.logits_chunk of them at a time (logprobs.answer_log_probs).
    `model`: see logprobs.answer_log_probs.
    """
    return -answer_log_probs(cfg, built, batch, answer_positions(batch), answer_targets(batch), model).sum()


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labelled positions that some earlier position predicts."""
    return int(answer_positions(batch).sum())


def backward_window(cfg: Config, built: Built, model: torch.nn.Module, batches: list[dict],
                    scaler: torch.amp.GradScaler, state: None = None,
                    filler: dict | None = None) -> tuple[float, int, dict]:
    """Forward + backward over one accumulation window; returns (loss per answer token, answer tokens, {}).

    Each micro-batch's summed loss is divided by the answer tokens of the *whole* window, so
    the accumulated .grad is the gradient of the per-token mean over the window. A window
    without answer tokens does nothing and returns (nan, 0, {}). `model` is built.model, or under
    torchrun its DDP wrapper (distributed.wrap); then the window is the global step's: its
    tokens counted on every rank, its loss summed over them, and its gradients summed by DDP in
    the backward of the last micro-batch. `filler`: see steps.filler_batch (DDP only).
    """
    n_tokens = int(distributed.total(sum(answer_tokens(b) for b in batches), built.device))
    if n_tokens == 0:
        return float("nan"), 0, {}
    losses = []
    for i, batch in enumerate(batches):
        if answer_tokens(batch) == 0:  # no usable sample here, or every answer masked: nothing to learn
            if filler is None:  # alone: skip it
                continue
            # Under DDP every rank must take part in every synchronised backward: run it anyway
            # (its loss is 0), or without a single sample, the filler (one sample, labels masked).
            batch = batch if len(batch["input_ids"]) else filler
        with distributed.synchronising(model, last=i == len(batches) - 1):
            loss = answer_loss_sum(cfg, built, batch, model) / n_tokens
            scaler.scale(loss).backward()
        losses.append(loss.detach())
    # Read back once per window: each .item() would make the CPU wait for the GPU to catch up.
    local = sum(torch.stack(losses).tolist()) if losses else 0.0
    return distributed.total(local, built.device), n_tokens, {}


def shown(logged: dict) -> dict[str, str]:
    return {}


@torch.no_grad()
def validation_loss(cfg: Config, built: Built, ds: datasets.Dataset) -> float:
    """Loss per answer token over the eval split (its first data.eval_samples rows if set); under
    torchrun each rank sums over its share of the rows, and the sums are added up."""
    rows = distributed.shard(min(cfg.data.eval_samples or len(ds), len(ds)), built.model)
    was_training = built.model.training
    built.model.eval()  # dropout off
    total, tokens = 0.0, 0
    for i in range(rows.start, rows.stop, cfg.train.batch_size):
        batch = collate(ds, list(range(i, min(i + cfg.train.batch_size, rows.stop))), cfg.data, built.family,
                        built.processor)
        batch_tokens = answer_tokens(batch)
        if batch_tokens == 0:
            continue
        total += answer_loss_sum(cfg, built, batch).item()
        tokens += batch_tokens
    built.model.train(was_training)
    total, tokens = distributed.totals([total, tokens], built.device)
    return total / max(tokens, 1)


def validation(cfg: Config, built: Built, ds: datasets.Dataset, state: None = None,
               answers: dict | None = None) -> dict[str, float]:
    return {"val_loss": validation_loss(cfg, built, ds)}


def report(when: str, figures: dict[str, float]) -> dict[str, float]:
    """The validation loss, as val_loss_before and val_loss_after in metrics.json."""
    print(f"validation loss {when} training: {figures['val_loss']:.4f} per answer token")
    return {f"val_loss_{when}": figures["val_loss"]}
