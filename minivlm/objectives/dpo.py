"""DPO: preference optimisation on the same QLoRA core (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

A preference row holds an image, a prompt x, a preferred answer y_w (data.answer_column, e.g.
"chosen") and a dispreferred one y_l (data.rejected_column, e.g. "rejected"). The policy π (the
base + the adapters being trained) learns against a frozen reference π_ref, per pair (eq. 7):

    L = −log σ(β · h),   h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

log π(y|x) is the *sum* of the log-probabilities of the answer's tokens: the tokens the SFT loss
is taken on, each family's answer-only label mask (end-of-answer token included). β · (log π −
log π_ref) is the answer's implicit reward (eq. 5, without β log Z(x), which the difference
cancels), and L is the logistic loss of the chosen answer's reward beating the rejected one's
(the Bradley-Terry model, eq. 1). β sets how far π may move from π_ref: the higher, the less.

cDPO (Mitchell 2023, "A note on DPO with noisy preferences") assumes each label is flipped with
probability ε (train.dpo_label_smoothing) and takes the expected loss over the two labels:

    L_ε = −(1 − ε) log σ(β h) − ε log σ(−β h)

The reference costs no memory:

  * without train.init_from, π_ref is the base model, which is the same model with its adapters
    switched off (lora.adapters_off). At step 0 B = 0, so π = π_ref: h = 0, L = log 2.
  * with train.init_from (an SFT adapter, the usual SFT → DPO pipeline), training starts from
    that adapter and π_ref *is* that adapter, frozen. Its tensors (the adapter's size, not the
    model's) are read once and copied into the adapter parameters for each reference forward,
    the trained values back after. Again π = π_ref at step 0, given lora.dropout = 0 (as the DPO
    configs set it): the reference runs in eval mode, the policy with dropout.

The reference forward runs without gradient and in eval mode (no dropout: π_ref is one fixed
function). With lora.dropout > 0 the policy's forward is noisier than the reference's; TRL's
DPOTrainer switches dropout off for that reason (disable_dropout), and the DPO configs here set
lora.dropout = 0.

Batches (collate_pairs): rows [chosen₁ … chosenₙ, rejected₁ … rejectedₙ], one forward for both
halves. A pair's image is read, decoded and cropped once, so both answers see the same pixels;
the processor then takes it once per row, since every family's processor expands image tokens
text by text. Accumulation divides each micro-batch's summed pair losses by the pairs of the
whole window (and of every rank), as SFT divides by answer tokens: the step's loss is the mean
over its pairs, however they fall into micro-batches.

Logged every step, as TRL logs them: rewards_chosen and rewards_rejected (mean β(log π − log
π_ref)), reward_margin (their difference), reward_accuracy (share of pairs whose chosen reward is
the higher). On held-out pairs (`held_out`, before and after training and every
train.eval_every): these, the loss, and preference_accuracy, the share of pairs where the model
itself finds the chosen answer more likely, log π(y_w|x) > log π(y_l|x). Rewards are all 0 before
training, so reward_accuracy says nothing then; preference_accuracy says how the base ranks the
pairs, and so whether training changed that.
"""

from __future__ import annotations

import math
from types import ModuleType

import datasets
import torch
import torch.nn.functional as F
from torch import nn

from minivlm import distributed
from minivlm.build import Built
from minivlm.batches import answer_positions, answer_targets, empty_batch, samples, within_max_length
from minivlm.config import Config, DataConfig
from minivlm.data import rejected_of
from minivlm.logprobs import answer_log_probs
from minivlm.objectives.reference import reference, reference_weights

COUNT = "pairs"
ROWS_PER_SAMPLE = 2  # chosen and rejected, in one forward
EXTRA_FORWARDS = 1  # the reference's, without gradient
PLOTTED = "preference_accuracy"  # what DPO changes; its greedy answers may not change at all
CURVE = ("loss", "val_loss")
SHARES = ()


def collate_pairs(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType, processor,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The family's training batch for the preference pairs `ds[indices]`: rows [chosen₁ … chosenₙ,
    rejected₁ … rejectedₙ], labels on each row's answer. Bad rows are skipped (data.on_bad_sample),
    and a pair with either row longer than data.max_length is dropped whole."""
    pairs = samples(ds, indices, cfg, family, generator)  # one crop per image of a pair: both answers see it
    if not pairs:  # a batch of zero rows, which the loop skips, as batches.collate's
        return empty_batch()
    images = [images for _, _, images, _ in pairs]
    chosen = [dialog for *_, dialog in pairs]
    rejected = [[(dialog[0][0], rejected_of(cfg, row))] for _, row, _, dialog in pairs]
    return within_max_length(family, processor, images + images, chosen + rejected, cfg,
                             [index for index, *_ in pairs], rows_per_sample=ROWS_PER_SAMPLE)


collate = collate_pairs


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a collate_pairs batch: half its rows."""
    return len(batch["input_ids"]) // 2


def sequence_logps(cfg: Config, built: Built, batch: dict[str, torch.Tensor],
                   model: nn.Module | None = None) -> torch.Tensor:
    """log π(y|x) of every row: its labelled tokens' log-probabilities, summed, in fp32; shape (rows,).

    As in sft.answer_loss_sum, only positions that predict an answer token go through the
    lm_head; their log-probabilities come in row-major order, so each token's row is its
    position's row in the mask. `model`: see logprobs.answer_log_probs.
    """
    token_logps = answer_log_probs(cfg, built, batch, answer_positions(batch), answer_targets(batch), model)
    rows = (batch["labels"][:, 1:] != -100).nonzero()[:, 0].to(built.device)
    return torch.zeros(len(batch["labels"]), device=built.device).index_add(0, rows, token_logps)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (eq. 7; cDPO with label_smoothing > 0) and the implicit rewards of the
    chosen and rejected answers (detached); each of shape (pairs,)."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # eq. 5: r = β log π(y|x) / π_ref(y|x)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    margin = chosen_rewards - rejected_rewards  # β h
    # eq. 7, −log σ(β h); cDPO: the expected loss when the label is flipped with probability ε
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def setup(cfg: Config, built: Built) -> dict[str, torch.Tensor] | None:
    """The reference's weights, read once for the whole run (see reference_weights)."""
    return reference_weights(cfg, built.model)


def iterations(cfg: Config) -> int:
    return 1


def planned(cfg: Config) -> dict:
    """Each pair is two rows of the forward."""
    return {"rows_per_sample": ROWS_PER_SAMPLE}


def _sums(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """What the per-pair figures add up to: loss, rewards, correctly ordered rewards."""
    return torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).sum()])


def _means(sums: list[float], pairs: int) -> tuple[float, dict[str, float]]:
    loss, chosen, rejected, right = (s / pairs for s in sums)
    return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
                  "reward_accuracy": right}


def backward_window(cfg: Config, built: Built, model: nn.Module, batches: list[dict], scaler: torch.amp.GradScaler,
                    weights: dict[str, torch.Tensor] | None,
                    filler: dict | None = None) -> tuple[float, int, dict[str, float]]:
    """Forward + backward over one accumulation window of pair batches (collate_pairs); returns (loss
    per pair, pairs, the mean rewards and reward accuracy). The DPO counterpart of sft.backward_window,
    with the same arguments (`weights`: reference_weights): each micro-batch's summed pair losses are
    divided by the pairs of the whole window, over every rank. A window without pairs does nothing
    and returns (nan, 0, {})."""
    t = cfg.train
    n_pairs = int(distributed.total(sum(pairs_in(b) for b in batches), built.device))
    if n_pairs == 0:
        return float("nan"), 0, {}
    sums = torch.zeros(4, device=built.device)
    for i, batch in enumerate(batches):
        with distributed.synchronising(model, last=i == len(batches) - 1):
            if not pairs_in(batch):  # no usable pair here
                if filler is None:  # alone: skip it
                    continue
                # Under torchrun every rank takes part in every synchronised backward (and under
                # FSDP in every forward, the reference's too): the filler's (labels masked, see
                # steps.filler_batch) add exactly zero to every gradient.
                if distributed.is_sharded(model):
                    with reference(built.model, weights):
                        sequence_logps(cfg, built, filler, model)
                scaler.scale(sequence_logps(cfg, built, filler, model).sum()).backward()
                continue
            # Through `model` too: under FSDP the wrapper gathers the sharded layers (and must have
            # run before any of its parts is called on its own).
            with reference(built.model, weights):
                ref = sequence_logps(cfg, built, batch, model)
            logps = sequence_logps(cfg, built, batch, model)
            n = pairs_in(batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], t.dpo_beta,
                                                                t.dpo_label_smoothing)
            scaler.scale(losses.sum() / n_pairs).backward()
        sums += _sums(losses, chosen_rewards, rejected_rewards)
    # Read back once per window: each .item() would make the CPU wait for the GPU to catch up.
    loss, rewards = _means(distributed.totals(sums.tolist(), built.device), n_pairs)
    return loss, n_pairs, rewards


@torch.no_grad()
def held_out(cfg: Config, built: Built, ds: datasets.Dataset,
             weights: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """DPO on the pairs of `ds` (its first data.eval_samples rows if set): dpo_loss, the mean rewards,
    reward_margin, reward_accuracy, and preference_accuracy (log π(y_w|x) > log π(y_l|x)). Under
    torchrun each rank takes its share of the rows (all of them under FSDP), and the sums are
    added up: the means are the same either way. `weights`: reference_weights, read once by the caller."""
    rows = distributed.shard(min(cfg.data.eval_samples or len(ds), len(ds)), built.model)
    was_training = built.model.training
    built.model.eval()  # dropout off
    sums, pairs, prefers = torch.zeros(4, device=built.device), 0, 0
    for i in range(rows.start, rows.stop, cfg.train.batch_size):
        batch = collate_pairs(ds, list(range(i, min(i + cfg.train.batch_size, rows.stop))), cfg.data, built.family,
                              built.processor)
        n = pairs_in(batch)
        if not n:
            continue
        logps = sequence_logps(cfg, built, batch)
        with reference(built.model, weights):
            ref = sequence_logps(cfg, built, batch)
        sums += _sums(*dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.train.dpo_beta,
                                cfg.train.dpo_label_smoothing))
        pairs += n
        prefers += int((logps[:n] > logps[n:]).sum())
    built.model.train(was_training)
    pairs, prefers, *sums = distributed.totals([pairs, prefers, *sums.tolist()], built.device)
    if not pairs:
        raise ValueError("the eval split has no usable preference pair")
    loss, rewards = _means(sums, pairs)
    return {"dpo_loss": loss, **rewards, "preference_accuracy": prefers / pairs}


def validation(cfg: Config, built: Built, ds: datasets.Dataset, weights: dict[str, torch.Tensor] | None,
               answers: dict | None = None) -> dict[str, float]:
    """held_out's figures, its DPO loss as the run's val_loss."""
    scores = held_out(cfg, built, ds, weights)
    return {"val_loss": scores.pop("dpo_loss"), **scores}


def report(when: str, figures: dict[str, float]) -> dict[str, float]:
    """validation's figures as metrics.json keeps them (<name>_<when>, the loss as dpo_loss), after one
    line of them."""
    print(f"preference accuracy {when} training: {figures['preference_accuracy']:.3f} on held-out pairs (log π(chosen) "
          f"> log π(rejected)); reward margin {figures['reward_margin']:.3f}, reward accuracy "
          f"{figures['reward_accuracy']:.3f}, DPO loss {figures['val_loss']:.4f} (log 2 = {math.log(2):.4f})")
    return {f"{'dpo_loss' if name == 'val_loss' else name}_{when}": value for name, value in figures.items()}


def shown(logged: dict) -> dict[str, str]:
    """This step's reward margin and reward accuracy, on the progress bar."""
    return {"margin": f"{logged['reward_margin']:.3f}", "r_acc": f"{logged['reward_accuracy']:.2f}"}
