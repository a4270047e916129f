"""GRPO: reinforcement learning from rewards a program checks (Shao et al. 2024, "DeepSeekMath",
§4.1), with the fixes of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") and
DAPO (Yu et al. 2025).

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

With gradient accumulation, each micro-batch's sum is divided by what the whole window's is
(sequences, or tokens, over every rank), as SFT divides by answer tokens: the step's loss is the
same however the window is split.

A step (backward_window), for the train.batch_size prompts of each micro-batch ([grpo] keys):

  1. sample num_generations completions per prompt with the policy in eval mode (sample); the
     prompt goes through the processor, the vision tower and the decoder once per prompt
     (evaluate.prefilled_once; the forwards of steps 3 and 4 take it once per completion:
     scoring_batch repeats the prompts' inputs);
  2. score them with the rewards (minivlm/rewards.py) and take the group advantages;
  3. with iterations > 1, keep π_old's log-probabilities (a forward without gradient); with
     beta > 0, π_ref's (objectives/reference.py: the adapters off, or train.init_from's);
  4. forward the completions through the policy and backpropagate policy_loss.

With iterations = μ > 1 the sampled window serves μ optimizer steps (steps.py repeats it), as
TRL's num_iterations does; what those steps need (the prompts' inputs, the completions, π_old,
π_ref, the advantages) is the objective's state, saved with a checkpoint taken inside the μ
steps, so a resumed run trains on the very same samples. Sampling draws from the global RNG,
which every checkpoint saves: a resumed run samples what the unbroken one would have.
"""

from __future__ import annotations

import dataclasses
import time
from types import ModuleType

import datasets
import torch
from PIL import Image

from minivlm import distributed
from minivlm.batches import samples, short_enough
from minivlm.build import Built
from minivlm.config import CHOICES, Config, DataConfig
from minivlm.data import rows_of
from minivlm.evaluate import generated
from minivlm.logprobs import answer_log_probs
from minivlm.models.processor import image_token_id
from minivlm.objectives.reference import reference, reference_weights
from minivlm.objectives.sft import answer_loss_sum
from minivlm.rewards import Rewards, build_rewards

COUNT = "completions"  # what a window's loss is divided by varies with loss_type; the log counts these
EXTRA_FORWARDS = 1  # the sampling's: about a forward over every completion token (more with beta or iterations)
PLOTTED = None  # data.metric, of greedy answers
CURVE = ("reward", "val_reward")  # the mean reward of the sampled completions, and of greedy ones held out
SHARES = ("zero_spread", "clip_fraction", "sample_share")  # the curves' third panel

LOSS_TYPES = CHOICES["grpo.loss_type"]
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
        return (summed / mask.sum(-1).clamp(min=1)).sum(), divisor(mask, loss_type), figures
    if loss_type == "dr_grpo":
        return summed.sum() / max_new_tokens, divisor(mask, loss_type), figures
    return summed.sum(), divisor(mask, loss_type), figures


def divisor(mask: torch.Tensor, loss_type: str) -> int:
    """What a micro-batch adds to the number its window's summed loss is divided by: its
    sequences (grpo, dr_grpo) or its completion tokens (dapo)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; known: {list(LOSS_TYPES)}")
    return int(mask.sum()) if loss_type == "dapo" else len(mask)


def answer_token_types(built: Built) -> dict[str, int]:
    """The type ids (TOKEN_TYPES) the family gives an answer token, read off one training batch."""
    image = Image.new("RGB", (32, 32))
    batch = built.family.training_batch(built.processor, [[image]], [[("a", "b")]])
    answer = (batch["labels"][0] != -100).nonzero()[0, 0]
    return {key: int(batch[key][0, answer]) for key in TOKEN_TYPES if key in batch}


def sample(cfg: Config, built: Built, inputs: dict[str, torch.Tensor], group: int, temperature: float, top_p: float,
           max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`group` completions of each prompt of `inputs` (the family's generation_batch: one row per
    prompt), sampled from the policy in eval mode (no dropout): (their ids, as generated, and the
    mask of each up to and with its first end token), both (prompts × group, length), a prompt's
    completions in a row. Each prompt goes through the vision tower and the decoder once, and its
    `group` rows decode from copies of its KV cache (evaluate.prefilled_once). A completion cut off at
    max_new_tokens has no end token and is kept whole."""
    # top_k=0: a checkpoint's generation_config may set top_k (50 by default), which would sample
    # from fewer tokens than top_p and temperature say. The image and video tokens are never
    # sampled: in the scoring forward one would be taken for an image's or a video's slot ("image
    # features and image tokens do not match"); a trained model gives them no mass anyway.
    media = [t for t in (image_token_id(built.processor), getattr(built.processor, "video_token_id", None))
             if t is not None]
    completion = generated(cfg, built, inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                           max_new_tokens=max_new_tokens, num_return_sequences=group,
                           suppress_tokens=media or None).cpu()
    is_end = torch.isin(completion, torch.tensor(built.model.generation_config.eos_token_id).flatten())
    # Up to and with the first end token: the count of ends strictly before each position is 0.
    return completion, (is_end.cumsum(1) - is_end.long()) == 0


def scoring_batch(inputs: dict[str, torch.Tensor], completion: torch.Tensor, mask: torch.Tensor, group: int,
                  types: dict[str, int]) -> dict[str, torch.Tensor]:
    """The batch that scores sampled completions: the prompts' inputs `group` times over, end to end,
    with the sampled ids appended as they are, not decoded and re-tokenised, which could split them
    otherwise. End to end, every tensor of the batch stays in sample order, whatever it is per
    (a row, an image, Qwen's patches of every image): the batch of the prompts listed `group` times.
    Its rows are therefore in completion order (the first completion of every prompt, then the
    second...), where `completion` and `mask` are in prompt order (completion_log_probs puts them
    back). Labels are each completion up to and with its first end token; the prompt (image
    tokens included) and what follows the end never. `types`: answer_token_types."""
    expanded = {key: torch.cat([value] * group) for key, value in inputs.items()}
    completion, mask = _in_completion_order(completion, group), _in_completion_order(mask, group)
    scored = {**expanded, "input_ids": torch.cat([expanded["input_ids"], completion], 1),
              "attention_mask": torch.cat([expanded["attention_mask"], mask.long()], 1),
              "labels": torch.cat([torch.full_like(expanded["input_ids"], -100), completion.masked_fill(~mask, -100)], 1)}
    for key, value in types.items():
        scored[key] = torch.cat([expanded[key], torch.full_like(completion, value)], 1)
    return scored


def _in_completion_order(x: torch.Tensor, group: int) -> torch.Tensor:
    """(prompts × group, ...) rows in prompt order (a prompt's completions together, as generate
    returns them) -> in completion order (the g-th completion of every prompt, g = 0, 1, ...)."""
    return x.view(-1, group, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _in_prompt_order(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.view(group, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def texts(processor, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The completions as the rewards read them: decoded up to their end, special tokens dropped."""
    decoded = processor.tokenizer.batch_decode(completion.masked_fill(~mask, processor.tokenizer.pad_token_id),
                                               skip_special_tokens=True)
    return [t.strip() for t in decoded]


def completion_log_probs(cfg: Config, built: Built, batch: dict[str, torch.Tensor], length: int, group: int,
                         model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(token) of each completion token, the mask of those tokens), both (rows, `length`), rows
    in prompt order: the completions are the last `length` columns of the scoring batch (of
    `group` completions a prompt), and only the positions that predict them go through the lm_head
    (logprobs.answer_log_probs, train.logits_chunk rows at a time)."""
    labels = batch["labels"]
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, -length - 1:-1] = True
    ids = labels[:, -length:]
    mask = ids != -100  # a completion's padding after its end: scored (as token 0), then masked out
    logp = answer_log_probs(cfg, built, batch, predicting, ids.clamp(min=0).flatten(), model).view(len(labels), length)
    return _in_prompt_order(logp, group), _in_prompt_order(mask.to(logp.device), group)


def collate(ds: datasets.Dataset, indices: list[int], cfg: DataConfig, family: ModuleType, processor,
            generator: torch.Generator | None = None) -> dict:
    """The prompts of `ds[indices]` for sampling: {"inputs": the family's generation batch (one row per
    prompt), "prompts", "rows", "numbers" (the rows' indices)}, the last three for the rewards. Bad rows
    are skipped (data.on_bad_sample), and so are prompts longer than data.max_length tokens."""
    chosen = samples(ds, indices, cfg, family, generator)
    images = [images for _, _, images, _ in chosen]
    prompts = [dialog[0][0] for *_, dialog in chosen]
    inputs = family.generation_batch(processor, images, prompts, system=cfg.system_prompt) if chosen else {}
    keep = short_enough(inputs, family, processor, cfg, [i for i, *_ in chosen]) if chosen else None
    if keep is not None and not keep.all():
        chosen, images, prompts = ([x for x, k in zip(xs, keep.tolist()) if k] for xs in (chosen, images, prompts))
        # Processed again without them: some processors flatten a batch's images into rows of no sample.
        inputs = family.generation_batch(processor, images, prompts, system=cfg.system_prompt) if chosen else {}
    return {"inputs": inputs, "prompts": prompts, "rows": [row for _, row, _, _ in chosen],
            "numbers": [i for i, *_ in chosen]}


@dataclasses.dataclass
class Rollout:
    """One micro-batch's sampled completions and what the updates on them need."""

    inputs: dict[str, torch.Tensor]  # the prompts' generation batch, one row per prompt
    completion: torch.Tensor  # (prompts × G, length) sampled ids
    mask: torch.Tensor  # (prompts × G, length): up to and with each first end token
    advantages: torch.Tensor  # (prompts × G,)
    old_logp: torch.Tensor | None  # π_old's log-probabilities per token (grpo.iterations > 1)
    ref_logp: torch.Tensor | None  # π_ref's (grpo.beta > 0)
    sums: dict[str, float]  # what the step log averages: rewards, spread, lengths (see _logged)


class State:
    """What GRPO holds through a run: the rewards, π_ref's weights, the answer token types, and the
    window being trained on with the optimizer steps it has left (grpo.iterations)."""

    def __init__(self, rewards: Rewards, reference: dict[str, torch.Tensor] | None, types: dict[str, int]):
        self.rewards, self.reference, self.types = rewards, reference, types
        self.window: list[Rollout | None] = []
        self.left = 0

    def state_dict(self) -> dict:
        """The window, while steps are left on it: a checkpoint inside the μ steps keeps it."""
        if not self.left:
            return {"left": 0}
        return {"left": self.left, "window": [dataclasses.asdict(r) if r else {} for r in self.window]}

    def load_state_dict(self, saved: dict | None) -> None:
        self.left = (saved or {}).get("left", 0)
        self.window = [Rollout(**r) if r else None for r in saved["window"]] if self.left else []


def setup(cfg: Config, built: Built) -> State:
    """The rewards (a mistake in them shows now), π_ref's weights with grpo.beta > 0, and the type ids
    a completion token takes."""
    reference_of = reference_weights(cfg, built.model) if cfg.grpo.beta else None
    return State(build_rewards(cfg, built.processor.tokenizer), reference_of, answer_token_types(built))


def iterations(cfg: Config) -> int:
    """Optimizer steps each sampled window serves (steps.py repeats it)."""
    return cfg.grpo.iterations


def planned(cfg: Config) -> dict:
    """plan_memory's shape of a step: each prompt is num_generations rows, sampled first (the KV
    cache of generate), whose loss is taken on max_new_tokens positions each."""
    return {"rows_per_sample": cfg.grpo.num_generations, "answer_tokens": cfg.grpo.max_new_tokens, "sampled": True}


def repeated(items: list, group: int) -> list:
    """Each item `group` times in a row: a prompt's (or row's) for each of its completions."""
    return [item for item in items for _ in range(group)]


def roll_out(cfg: Config, built: Built, batch: dict, state: State) -> Rollout | None:
    """Steps 1-3 of the module docstring for one micro-batch of prompts (collate's); None if it has none."""
    g = cfg.grpo
    if not batch["prompts"]:
        return None
    completion, mask = sample(cfg, built, batch["inputs"], g.num_generations, g.temperature, g.top_p,
                              g.max_new_tokens)
    rewards, each = state.rewards(repeated(batch["prompts"], g.num_generations), texts(built.processor, completion, mask),
                                  repeated(batch["rows"], g.num_generations),
                                  repeated(batch["numbers"], g.num_generations))
    old_logp = ref_logp = None
    if g.iterations > 1 or g.beta:
        scored = scoring_batch(batch["inputs"], completion, mask, g.num_generations, state.types)
        if g.iterations > 1:  # π_old: the policy as it sampled, without dropout
            was_training = built.model.training
            built.model.eval()
            with torch.no_grad():
                old_logp = completion_log_probs(cfg, built, scored, completion.shape[1], g.num_generations)[0]
            built.model.train(was_training)
        if g.beta:
            with reference(built.model, state.reference):
                ref_logp = completion_log_probs(cfg, built, scored, completion.shape[1], g.num_generations)[0]
    groups = rewards.view(-1, g.num_generations)
    sums = {"reward": rewards.sum(), "reward_std": groups.std(1).sum(),
            "zero_spread": (groups.max(1).values == groups.min(1).values).sum(), "groups": len(groups),
            "completions": len(rewards), "completion_tokens": mask.sum(),
            **{f"reward_{name}": sum(values) for name, values in each.items()}}
    return Rollout(dict(batch["inputs"]), completion, mask,
                   group_advantages(rewards, g.num_generations, scale=g.scale_rewards == "group").float(),
                   old_logp, ref_logp, {k: float(v) for k, v in sums.items()})


def _logged(sums: dict[str, float]) -> dict[str, float]:
    """The step log's figures from the window's sums (every rank's)."""
    n, groups, tokens = sums.pop("completions"), sums.pop("groups"), sums["completion_tokens"]
    logged = {k: v / n for k, v in sums.items() if k.startswith("reward") and k != "reward_std"}
    logged.update(reward_std=sums["reward_std"] / groups, zero_spread=sums["zero_spread"] / groups,
                  completion_length=tokens / n, clip_fraction=sums["clipped"] / max(tokens, 1))
    if "kl" in sums:
        logged["kl"] = sums["kl"] / max(tokens, 1)
    return logged


def backward_window(cfg: Config, built: Built, model: torch.nn.Module, batches: list[dict],
                    scaler: torch.amp.GradScaler, state: State,
                    filler: dict | None = None) -> tuple[float, int, dict[str, float]]:
    """Sample (when the window is new: `batches` is [] on the steps that repeat it), score, and take
    forward + backward of policy_loss over the window; returns (the loss, the completions, the
    figures to log). Each micro-batch's summed loss is divided by the window's divisor (sequences or
    tokens, per grpo.loss_type) over every rank, so the gradient is that of the whole window's loss.
    `model`: built.model, or its DDP wrapper; `filler`: see steps.filler_batch (DDP only)."""
    g = cfg.grpo
    started = time.perf_counter()
    if batches:
        state.window, state.left = [roll_out(cfg, built, b, state) for b in batches], g.iterations
    elif not state.left:
        raise RuntimeError("a repeated GRPO window without its sampled completions (the save's objective state)")
    sampled = time.perf_counter()
    sample_s = sampled - started if batches else 0.0  # a repeated window samples nothing
    state.left -= 1
    rollouts = state.window
    count = int(distributed.total(sum(divisor(r.mask, g.loss_type) for r in rollouts if r), built.device))
    if count == 0:
        return float("nan"), 0, {}
    loss = torch.zeros((), device=built.device)
    tokens = torch.zeros((), device=built.device)
    clipped = kl = 0.0
    for i, r in enumerate(rollouts):
        with distributed.synchronising(model, last=i == len(rollouts) - 1):
            if r is None:  # no prompt here: under DDP, a backward that adds zero (see sft.backward_window)
                if filler is not None:
                    scaler.scale(answer_loss_sum(cfg, built, filler, model)).backward()
                continue
            scored = scoring_batch(r.inputs, r.completion, r.mask, g.num_generations, state.types)
            logp, mask = completion_log_probs(cfg, built, scored, r.completion.shape[1], g.num_generations, model)
            old = r.old_logp if r.old_logp is not None else logp.detach()  # μ = 1: π_old is π_θ, ρ = 1
            summed, _, figures = policy_loss(logp, old, r.ref_logp, r.advantages.to(logp.device), mask, g.loss_type,
                                             g.epsilon, g.epsilon_high or g.epsilon, g.beta, g.max_new_tokens)
            scaler.scale(summed / count).backward()
        loss += summed.detach() / count
        tokens += scored["attention_mask"].sum()
        n = int(mask.sum())
        clipped, kl = clipped + figures["clip_fraction"] * n, kl + figures.get("kl", 0.0) * n
    # Every rank's sums, in one exchange: the same keys on every rank, whether it had prompts or not.
    keys = ["reward", "reward_std", "zero_spread", "groups", "completions", "completion_tokens",
            *(f"reward_{name}" for name in state.rewards.functions)]
    local = [float(loss), float(tokens), clipped, kl, *(sum(r.sums[k] for r in rollouts if r) for k in keys)]
    loss_total, tokens_total, clipped, kl, *summed_up = distributed.totals(local, built.device)
    sums = dict(zip(keys, summed_up), clipped=clipped, **({"kl": kl} if g.beta else {}))
    completions = int(sums["completions"])
    logged = _logged(sums)
    update_s = time.perf_counter() - sampled
    logged.update(sample_s=sample_s, update_s=update_s, sample_share=sample_s / (sample_s + update_s),
                  tokens=int(tokens_total))
    return loss_total, completions, logged


def shown(logged: dict) -> dict[str, str]:
    """This step's mean reward and the share of its groups without spread, on the progress bar."""
    return {"reward": f"{logged['reward']:.3f}", "flat": f"{logged['zero_spread']:.2f}"}


def validation(cfg: Config, built: Built, ds: datasets.Dataset, state: State, answers: dict) -> dict[str, float]:
    """The rewards of the greedy answers to the eval split's prompts (evaluate's `answers`, which
    data.metric scores too): their weighted sum's mean as val_reward, and each function's."""
    numbers = answers["rows"]
    total, each = state.rewards(answers["prompts"], answers["predictions"], rows_of(ds, numbers), numbers)
    return {"val_reward": float(total.mean()), **{f"val_reward_{k}": sum(v) / len(v) for k, v in each.items()}}


def report(when: str, figures: dict[str, float]) -> dict[str, float]:
    """validation's figures as metrics.json keeps them (reward_<when>, reward_<name>_<when>), after a line."""
    each = {k.removeprefix("val_reward_"): v for k, v in figures.items() if k.startswith("val_reward_")}
    print(f"mean reward {when} training: {figures['val_reward']:.3f} on held-out prompts (greedy answers)"
          + (f"; {', '.join(f'{k} {v:.3f}' for k, v in each.items())}" if len(each) > 1 else ""))
    return {f"{k.removeprefix('val_')}_{when}": v for k, v in figures.items()}
