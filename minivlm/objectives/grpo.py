"""GRPO: reinforcement learning from rewards a program checks (Shao et al. 2024, "DeepSeekMath",
§4.1), with the fixes of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") and
DAPO (Yu et al. 2025).

Work in progress (issue 22): the math of a step is here and tested; sampling, rewards and the
objective's seam (objectives/__init__.py) come next, and only then is "grpo" a train.objective.

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

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


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
