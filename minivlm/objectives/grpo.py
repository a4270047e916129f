"""GRPO: reinforcement learning from rewards a program checks (Shao et al. 2024, "DeepSeekMath",
§4.1), with the fixes of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") and
DAPO (Yu et al. 2025).

Work in progress (issue 22): the math of a step, sampling and scoring completions are here and
tested (rewards are minivlm/rewards.py); the config and the objective's seam
(objectives/__init__.py) come next, and only then is "grpo" a train.objective.

For a prompt q (an image and a question), G completions o_1 … o_G are sampled from the policy as
it was when sampling, π_old, and each gets a reward r_i. Its advantage is its reward against its
group's (outcome supervision, §4.1.2):

    Â_i = (r_i − mean(r)) / std(r)         Dr. GRPO: Â_i = r_i − mean(r), no std scaling

so a group whose rewards are all equal teaches nothing. Every token t of o_i then takes the
clipped-ratio loss of PPO, plus β times an estimate of the KL divergence to a reference π_ref:

    ρ_i,t  = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    ℓ_i,t  = −min(ρ_i,t Â_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) Â_i) + β · KL_i,t
    KL_i,t = π_ref/π_θ − log(π_ref/π_θ) − 1           (k3, Schulman 2020: unbiased, never < 0)

DAPO's "clip higher" is ε_high > ε_low. With one update per sampled batch, π_θ = π_old at the
update, so ρ = 1 and clipping never acts: the gradient is the policy gradient Â ∇log π. The
losses differ in how the token terms are averaged (loss_type):

    grpo      each sequence's mean over its tokens, then the mean over sequences (the paper's);
              a long wrong answer is punished less per token than a short one
    dr_grpo   the sum over every token / (sequences × max new tokens): a constant, no length bias
    dapo      the sum over every token / the tokens of the batch (token-level)

With gradient accumulation, each micro-batch hands the loop its terms' sum and what the window's
sum is divided by (sequences, or tokens), as SFT divides by answer tokens: the step's loss is the
same however the window is split.
"""

from __future__ import annotations

import torch
from PIL import Image

from minivlm.build import DTYPES, Built
from minivlm.config import Config
from minivlm.precision import autocast, logits_of, model_inputs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
# Per-token inputs besides input_ids and attention_mask: a completion appended to a prompt takes
# the value the family's training batches give an answer token (PaliGemma's token_type_ids mark
# the answer 1, its prefix-LM's causal part; Gemma 3's token_type_ids and Qwen's
# mm_token_type_ids mark image tokens 1, so an answer is 0).
TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, N = prompts × `group` completions in prompt order -> (N,) advantages: each
    reward minus its group's mean, over the group's standard deviation if `scale` (GRPO), not
    (Dr. GRPO). The 1e-4 is TRL's: a group whose rewards are equal gets 0, not 0/0."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    return centred.flatten()


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of the positions that predict (B, T) ids -> (B, T) log π(id): the chosen
    logit minus the log-sum-exp, without the (B, T, V) log-softmax in memory."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, loss_type: str, epsilon_low: float,
                epsilon_high: float, beta: float, max_new_tokens: int) -> tuple[torch.Tensor, int, dict]:
    """One micro-batch's loss terms: (their sum as loss_type sums them, what the window's sum is
    divided by, figures to log). `logp`, `old_logp`, `ref_logp`: (B, T) log-probabilities of each
    completion token under π_θ, π_old (at sampling) and π_ref (None when β = 0); `mask`: (B, T),
    1 on the completion's tokens up to and with its end token, 0 after it."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * a, clipped * a)
    figures = {}
    if beta:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = per_token + beta * kl
        figures["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    # Where the clip takes the gradient away: the ratio beyond the side its advantage pushes it to.
    clipping = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    figures["clip_fraction"] = float((clipping * mask).sum() / mask.sum().clamp(min=1))
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp(min=1)).sum(), len(logp), figures
    if loss_type == "dr_grpo":
        return summed.sum() / max_new_tokens, len(logp), figures
    if loss_type == "dapo":
        return summed.sum(), int(mask.sum()), figures
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; known: {list(LOSS_TYPES)}")


def answer_token_types(built: Built) -> dict[str, int]:
    """The type ids (TOKEN_TYPES) the family gives an answer token, read off one training batch."""
    image = Image.new("RGB", (32, 32))
    batch = built.family.training_batch(built.processor, [image], [[("a", "b")]])
    answer = (batch["labels"][0] != -100).nonzero()[0, 0]
    return {key: int(batch[key][0, answer]) for key in TOKEN_TYPES if key in batch}


@torch.no_grad()
def sample(cfg: Config, built: Built, images: list[Image.Image], prompts: list[str], group: int, temperature: float,
           top_p: float, max_new_tokens: int, types: dict[str, int]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`group` completions of each (image, prompt), sampled from the policy in eval mode (no
    dropout), and the batch that scores them: (that batch, the completions' text, prompt by prompt).

    The images go through the processor and the vision tower once per prompt: generate expands
    the prompt's inputs to its `group` rows. The scoring batch is those expanded inputs (the
    model's own _expand_inputs_for_generation, which knows how its family lays out pixel_values)
    with the sampled tokens appended as they are, not decoded and re-tokenised, which could
    split them otherwise: labels are the completion up to and with its first end token, the
    prompt (image tokens included) and what follows the end never. A completion cut off at
    max_new_tokens has no end token and is labelled whole. `types`: answer_token_types.
    """
    model, processor = built.model, built.processor
    batch = built.family.generation_batch(processor, images, prompts, system=cfg.data.system_prompt)
    inputs = model_inputs(batch, built.device, DTYPES[cfg.model.dtype])
    was_training = model.training
    model.eval()
    with autocast(cfg, built.device):
        # top_k=0: a checkpoint's generation_config may set top_k (50 by default), which would
        # sample from fewer tokens than top_p and temperature say.
        out = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=group, use_cache=True)
    model.train(was_training)
    prompt_length = inputs["input_ids"].shape[1]
    completion = out[:, prompt_length:].cpu()
    ends = torch.tensor(model.generation_config.eos_token_id).flatten()
    is_end = torch.isin(completion, ends)
    # Up to and with the first end token: the count of ends strictly before each position is 0.
    mask = (is_end.cumsum(1) - is_end.long()) == 0
    input_ids, expanded = model._expand_inputs_for_generation(expand_size=group, input_ids=batch["input_ids"],
                                                               **{k: v for k, v in batch.items() if k != "input_ids"})
    scored = {**expanded, "input_ids": torch.cat([input_ids, completion], 1),
              "attention_mask": torch.cat([expanded["attention_mask"], mask.long()], 1),
              "labels": torch.cat([torch.full_like(input_ids, -100), completion.masked_fill(~mask, -100)], 1)}
    for key, value in types.items():
        scored[key] = torch.cat([expanded[key], torch.full_like(completion, value)], 1)
    texts = processor.tokenizer.batch_decode(completion.masked_fill(~mask, processor.tokenizer.pad_token_id),
                                             skip_special_tokens=True)
    return scored, [t.strip() for t in texts]


def completion_log_probs(cfg: Config, built: Built, batch: dict[str, torch.Tensor],
                         model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(token) of each completion token, the mask of those tokens), both (rows, completion
    length): the logits of the positions that predict them, only (precision.logits_of)."""
    labels = batch["labels"]
    length = labels.shape[1] - int((labels != -100).any(0).nonzero()[0, 0])  # the completion's columns
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, -length - 1:-1] = True
    logits = logits_of(cfg, built, batch, at=predicting, model=model).view(len(labels), length, -1)
    ids = labels[:, -length:]
    mask = ids != -100
    return token_log_probs(logits, ids.clamp(min=0).to(logits.device)), mask.to(logits.device)
