"""GRPO's math (objectives/grpo.py): the advantages, and the loss and its gradient, against the
formula computed token by token from full logits and against TRL's GRPOTrainer loss."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from minivlm.logprobs import log_probs
from minivlm.objectives.grpo import LOSS_TYPES, group_advantages, policy_loss


def test_advantages_are_the_reward_against_its_group_and_zero_where_all_agree():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    scaled, unscaled = group_advantages(rewards, 4), group_advantages(rewards, 4, scale=False)
    for g in range(3):
        r = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # unbiased, as torch.std and TRL
        for k in range(4):
            assert unscaled[4 * g + k].item() == pytest.approx(r[k] - mean)
            assert scaled[4 * g + k].item() == pytest.approx((r[k] - mean) / (std + 1e-4))
    assert torch.equal(scaled[4:8], torch.zeros(4)) and torch.equal(unscaled[4:8], torch.zeros(4))


def batch(seed: int = 0, drift: float = 0.3):
    """Full logits of 6 completions (2 prompts × 3) of up to 7 tokens, their masks (lengths 7, 3,
    5, 1, 7, 4), the log-probabilities at sampling (π_old, `drift` away so that clipping acts) and
    the reference's, and the advantages."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (6, 7), generator=g)
    lengths = [7, 3, 5, 1, 7, 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    with torch.no_grad():
        now = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        old = now + drift * torch.randn(6, 7, generator=g, dtype=torch.float64)
        ref = now + 0.5 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64), 3)
    return logits, ids, mask, old, ref, advantages, lengths


EPS_LOW, EPS_HIGH, BETA, MAX_NEW = 0.2, 0.28, 0.04, 7


def by_hand(logits, ids, old, ref, advantages, lengths, loss_type: str) -> torch.Tensor:
    """The loss of the module docstring, one token at a time from the full log-softmax."""
    total, tokens = 0.0, 0
    per_sequence = []
    for i, n in enumerate(lengths):
        terms = []
        for t in range(n):
            logp = logits[i, t].log_softmax(-1)[ids[i, t]]
            ratio = torch.exp(logp - old[i, t])
            a = advantages[i]
            clipped = torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
            kl = torch.exp(ref[i, t] - logp) - (ref[i, t] - logp) - 1
            terms.append(-torch.min(ratio * a, clipped * a) + BETA * kl)
        per_sequence.append(sum(terms) / n)
        total = total + sum(terms)
        tokens += n
    if loss_type == "grpo":
        return sum(per_sequence) / len(lengths)
    if loss_type == "dr_grpo":
        return total / (len(lengths) * MAX_NEW)
    return total / tokens


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_equal_the_formula_on_full_logits(loss_type):
    logits, ids, mask, old, ref, advantages, lengths = batch()
    summed, count, figures = policy_loss(log_probs(logits, ids), old, ref, advantages, mask, loss_type,
                                         EPS_LOW, EPS_HIGH, BETA, MAX_NEW)
    ours = summed / count
    (grad,) = torch.autograd.grad(ours, logits)
    want = by_hand(logits, ids, old, ref, advantages, lengths, loss_type)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(grad, want_grad)
    assert 0 < figures["clip_fraction"] < 1 and figures["kl"] > 0  # clipping acts on some tokens here
    assert grad[torch.tensor(lengths) == 1, 1:].abs().sum() == 0  # nothing after a completion's end


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_micro_batches_give_the_windows_loss(loss_type):
    """The loop sums the terms of the window's micro-batches and divides by the sum of their counts."""
    logits, ids, mask, old, ref, advantages, _ = batch()
    logp = log_probs(logits, ids)
    args = (loss_type, EPS_LOW, EPS_HIGH, BETA, MAX_NEW)
    whole, count, _ = policy_loss(logp, old, ref, advantages, mask, *args)
    halves = [policy_loss(logp[s], old[s], ref[s], advantages[s], mask[s], *args) for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(sum(h[0] for h in halves) / sum(h[1] for h in halves), whole / count)


def test_one_update_per_sample_has_ratio_one_and_no_clipping():
    """iterations = 1: π_old is π_θ at the update, so ρ = 1, nothing is clipped, and without the
    KL term the gradient is the policy gradient, −Â ∇log π averaged as loss_type averages."""
    logits, ids, mask, _, _, advantages, lengths = batch()
    logp = log_probs(logits, ids)
    summed, count, figures = policy_loss(logp, logp.detach(), None, advantages, mask, "dapo", EPS_LOW, EPS_HIGH, 0.0,
                                         MAX_NEW)
    assert figures == {"clip_fraction": 0.0}
    (grad,) = torch.autograd.grad(summed / count, logits)
    pg = -(advantages.unsqueeze(1) * log_probs(logits, ids) * mask).sum() / mask.sum()
    (want,) = torch.autograd.grad(pg, logits)
    torch.testing.assert_close(grad, want)


def test_the_kl_term_is_zero_when_the_policy_is_the_reference():
    """At step 0 the adapters' B is 0, so π_θ = π_ref: with β > 0 the KL term adds nothing."""
    logits, ids, mask, _, _, advantages, _ = batch()
    logp = log_probs(logits, ids)
    with_kl = policy_loss(logp, logp.detach(), logp.detach(), advantages, mask, "grpo", EPS_LOW, EPS_HIGH, 0.5, MAX_NEW)
    without = policy_loss(logp, logp.detach(), None, advantages, mask, "grpo", EPS_LOW, EPS_HIGH, 0.0, MAX_NEW)
    assert with_kl[2]["kl"] == 0.0
    torch.testing.assert_close(with_kl[0], without[0])


class TRLStandIn:
    """What trl's GRPOTrainer._compute_loss reads of its trainer, for one micro-batch in training:
    the per-token log-probabilities are handed over as the model's, so the two losses are
    compared on the same inputs."""

    def __init__(self, logp: torch.Tensor, loss_type: str):
        identity = lambda x, **_: x  # noqa: E731  (one process: gathering and reducing change nothing)
        self._logp = logp
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, BETA, EPS_LOW, EPS_HIGH
        self.max_completion_length, self.current_gradient_accumulation_steps = MAX_NEW, 1
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.importance_sampling_level = 1.0, None, "token"
        self.use_vllm, self.aux_loss_enabled, self._entropy_bonus_enabled = False, False, False
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity,
                                           num_processes=1)
        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logp, torch.zeros_like(self._logp), None


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_equal_trls(loss_type):
    from trl import GRPOTrainer

    logits, ids, mask, old, ref, advantages, _ = batch(seed=1)
    logp = log_probs(logits, ids)
    summed, count, figures = policy_loss(logp, old, ref, advantages, mask, loss_type, EPS_LOW, EPS_HIGH, BETA, MAX_NEW)
    (grad,) = torch.autograd.grad(summed / count, logits)
    stand_in = TRLStandIn(log_probs(logits, ids), loss_type)
    inputs = {"prompt_ids": torch.zeros(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": ids, "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    theirs = GRPOTrainer._compute_loss(stand_in, None, inputs)
    (their_grad,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(summed / count, theirs)
    torch.testing.assert_close(grad, their_grad)
    assert stand_in._metrics["train"]["clip_ratio/region_mean"] == [pytest.approx(figures["clip_fraction"])]
    assert stand_in._metrics["train"]["kl"] == [pytest.approx(figures["kl"])]


def test_sampled_completions_are_scored_token_for_token(tiny_paligemma, shapes_data, tmp_path):
    """The scoring batch is the prompt as generate saw it with the sampled tokens appended: its
    log-probabilities are those the sampler drew from, token for token (PaliGemma's answer type
    ids included: typed as prefix, a completion would see itself bidirectionally). Labels stop at
    each completion's first end token, which half the vocabulary is here, so that most end early."""
    from conftest import tiny_config
    from minivlm.build import build
    from minivlm.data import images_of, load_split, prompt_of, rows_of
    from minivlm.objectives.grpo import answer_token_types, completion_log_probs, sample, scoring_batch, texts

    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    built = build(cfg)
    built.model.generation_config.eos_token_id = list(range(0, built.model.config.text_config.vocab_size, 2))
    rows = rows_of(load_split(cfg.data, "train"), [0, 1])
    images, prompts = [images_of(cfg.data, r) for r in rows], [prompt_of(cfg.data, r) for r in rows]
    types = answer_token_types(built)
    assert types == {"token_type_ids": 1}

    inputs = built.family.generation_batch(built.processor, images, prompts)
    torch.manual_seed(0)
    sampled, ended = sample(cfg, built, inputs, 3, 1.0, 1.0, 6)
    scored = scoring_batch(inputs, sampled, ended, 3, types)
    decoded = texts(built.processor, sampled, ended)
    torch.manual_seed(0)
    out = built.model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6,
                               num_return_sequences=3, output_logits=True, return_dict_in_generate=True,
                               suppress_tokens=[built.processor.image_token_id])
    width = inputs["input_ids"].shape[1]
    completion = out.sequences[:, width:]  # prompt order: prompt 0's three completions, then prompt 1's
    # The scoring batch is the two prompts three times over, end to end: completion g of prompt i is
    # its row 2g + i.
    order = [3 * i + g for g in range(3) for i in range(2)]
    assert len(decoded) == 6 and torch.equal(scored["input_ids"][:, width:width + completion.shape[1]], completion[order])
    assert torch.equal(scored["input_ids"][:, :width], torch.cat([inputs["input_ids"]] * 3))

    labels = scored["labels"]
    assert (labels[:, :width] == -100).all()  # the prompt, image tokens included, never
    ends = completion[order] % 2 == 0
    for row in range(6):
        first_end = int(ends[row].nonzero()[0, 0]) if ends[row].any() else completion.shape[1] - 1
        assert (labels[row, width:width + first_end + 1] == completion[order][row, :first_end + 1]).all()
        assert (labels[row, width + first_end + 1:] == -100).all()
        assert (scored["attention_mask"][row, width + first_end + 1:] == 0).all()
    assert sum(int(e.any()) for e in ends) >= 3  # the end-token masking was exercised

    built.model.eval()
    logp, mask = completion_log_probs(cfg, built, scored, sampled.shape[1], 3)  # back in prompt order
    drawn = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[mask], drawn[:, :logp.shape[1]][mask], atol=1e-4, rtol=1e-4)


def characters(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A reward with spread on a random model's completions: their length in characters, mod 5."""
    return [float(len(c) % 5) for c in completions]


def grpo_config(model_dir, data_dir, out, **grpo):
    from conftest import tiny_config
    cfg = tiny_config(model_dir, data_dir, out, objective="grpo", batch_size=2, max_steps=6, lr=5e-3,
                      optimizer="adamw_8bit", warmup_steps=1)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 64, 16.0, 0.1  # r=64: 8-bit Adam moments; dropout: the RNG
    cfg.grpo.num_generations, cfg.grpo.max_new_tokens, cfg.grpo.rewards = 3, 5, ["test_grpo:characters"]
    for key, value in grpo.items():
        setattr(cfg.grpo, key, value)
    return cfg


def recording(monkeypatch) -> list[torch.Tensor]:
    """The completions grpo.sample draws, in order, from here on."""
    from minivlm.objectives import grpo
    drawn, real = [], grpo.sample
    monkeypatch.setattr(grpo, "sample", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    return drawn


def test_a_resumed_run_samples_and_trains_what_the_unbroken_one_did(tiny_paligemma, shapes_data, tmp_path,
                                                                   monkeypatch):
    """grpo.iterations = 2 and a save at step 3, inside the second sampled window: the resumed run
    trains step 4 on the window sampled before the save (kept in the checkpoint), then samples
    steps 5-6's as the unbroken run did (the RNG restored), and ends bit-identical."""
    from conftest import count_steps, crash_after_first_save
    from safetensors.torch import load_file

    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import grpo

    monkeypatch.chdir(tmp_path)
    ds = load_split(grpo_config(tiny_paligemma, shapes_data, tmp_path).data, "train")
    full_cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path / "full", iterations=2)
    drawn_full = recording(monkeypatch)
    train(full_cfg, build(full_cfg), grpo, ds)
    assert len(drawn_full) == 3  # 6 steps, a window sampled every 2

    split = grpo_config(tiny_paligemma, shapes_data, tmp_path / "split", iterations=2)
    split.train.save_every = 3
    drawn_split = recording(monkeypatch)
    crash_after_first_save(monkeypatch, lambda: train(split, build(split), grpo, ds))
    saved = json.loads((tmp_path / "split/last/state.json").read_text())
    assert saved["step"] == 3 and saved["state"]["objective"]["left"] == 1  # one more step on its window
    trained = count_steps(monkeypatch, grpo)
    train(split, build(split), grpo, ds, resume=tmp_path / "split/last")
    assert len(trained) == 3 and len(drawn_split) == 3  # steps 4-6, of which step 4 sampled nothing
    for (ids_a, mask_a), (ids_b, mask_b) in zip(drawn_full, drawn_split):
        assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)

    a, b = (load_file(tmp_path / run / "last/adapter.safetensors") for run in ("full", "split"))
    assert a.keys() == b.keys() and any(k.endswith("lora_B") and a[k].abs().sum() > 0 for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (load_file(tmp_path / run / "last/state.safetensors") for run in ("full", "split"))
    optimizer = [k for k in sa if k.startswith("s.optimizer")]
    assert optimizer and all(torch.equal(sa[k], sb[k]) for k in optimizer)
    full_log = [json.loads(line) for line in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    split_log = [json.loads(line) for line in (tmp_path / "split/log.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in full_log] == [r["reward"] for r in split_log]
    assert full_log[0]["reward"] == full_log[1]["reward"] and full_log[1]["sample_s"] == 0.0  # a repeated window


def test_one_update_per_sample_never_clips_and_the_kl_starts_at_zero(tiny_paligemma, shapes_data, tmp_path,
                                                                   monkeypatch):
    """grpo.iterations = 1: ρ = 1 and nothing clips, on any step. grpo.beta > 0 with the adapters off as
    the reference: the first step's KL is 0 (B = 0: π_θ = π_ref), and later ones are not."""
    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import grpo

    monkeypatch.chdir(tmp_path)
    cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path / "run", beta=0.5, epsilon=1e-6)
    cfg.lora.dropout = 0.0
    train(cfg, build(cfg), grpo, load_split(cfg.data, "train"))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(r["clip_fraction"] == 0.0 for r in log)
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0
    assert all(0 <= r["zero_spread"] <= 1 and r["completion_length"] > 0 and r["completions"] == 6 for r in log)

    # grpo.iterations = 2: the second step on a window compares π_θ, one update on, with π_old at sampling.
    cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path / "twice", iterations=2, epsilon=1e-6)
    cfg.lora.dropout = 0.0
    train(cfg, build(cfg), grpo, load_split(cfg.data, "train"))
    log = [json.loads(line) for line in (tmp_path / "twice/log.jsonl").read_text().splitlines()]
    assert [r["clip_fraction"] == 0.0 for r in log] == [True, False] * 3


@pytest.mark.parametrize("lora", [{"init": "pissa"}, {"use_dora": True}], ids=["pissa", "dora"])
def test_the_kl_starts_at_zero_for_a_lora_variant(lora, tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """π_ref with the adapters off is the model before training for each variant: PiSSA's is
    W_res + s·B₀A₀ (not W_res), DoRA's m/‖W‖_c = 1. So step 1's KL is 0 and a later one's is not."""
    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.loop import train
    from minivlm.objectives import grpo

    monkeypatch.chdir(tmp_path)
    cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path / "run", beta=0.5, epsilon=1e-6)
    cfg.lora.dropout = 0.0
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    train(cfg, build(cfg), grpo, load_split(cfg.data, "train"))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0


FAILING = """
calls = 0


def third_call_fails(prompts, completions, rows):
    global calls
    calls += 1
    if calls == 3:  # the evaluation before training, step 1, then step 2
        return [1.0] * (len(completions) - 1) + [None]
    return [float(len(c) % 5) for c in completions]
"""


def test_a_reward_that_fails_mid_run_is_one_message_and_the_last_save_is_intact(tiny_paligemma, shapes_data, tmp_path,
                                                                              monkeypatch, capsys):
    """Through train.py: the evaluation before training calls the reward once, step 1 once and is saved,
    step 2's call returns None for its last completion: one error line naming the reward, the row and
    the completion, and the step-1 save loads."""
    from minivlm.cli import train
    from minivlm.checkpoint import latest_checkpoint, read_state

    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_rewards.py").write_text(FAILING)
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", "data.eval_samples=4",
            "train.objective=grpo", "train.batch_size=2", "train.max_steps=4", "train.save_every=1", "train.eval_every=0",
            "train.optimizer=adamw", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "lora.dropout=0.0",
            "grpo.num_generations=2", "grpo.max_new_tokens=3", 'grpo.rewards=["user_rewards:third_call_fails"]']
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(Path(__file__).parents[1] / "configs/demo.toml"), *sum((["--set", s] for s in sets), [])])
    message = str(stop.value.code)
    assert message.startswith("error: reward third_call_fails returned None on row ") and "(completion " in message
    assert "the last checkpoint (if any) is intact; continue with: python train.py" in message
    assert len(message.splitlines()) == 2
    saved = latest_checkpoint(tmp_path / "run")
    assert read_state(saved)["step"] == 1 and (saved / "adapter.safetensors").stat().st_size > 0


def test_the_plan_counts_the_sampling_kv_cache_as_generate_holds_it(tiny_paligemma, shapes_data, tmp_path):
    """--dry-run's sampling term against the keys and values generate really keeps, for batch_size
    prompts × num_generations rows at the length they reach; and the training rows it plans for."""
    from minivlm.build import build
    from minivlm.data import images_of, load_split, prompt_of, rows_of
    from minivlm.objectives import grpo, sft
    from minivlm.plan import plan_memory

    cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path)
    built = build(cfg)
    rows = rows_of(load_split(cfg.data, "train"), [0, 1])
    inputs = built.family.generation_batch(built.processor, [images_of(cfg.data, r) for r in rows],
                                           [prompt_of(cfg.data, r) for r in rows])
    out = built.model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=5, min_new_tokens=5,
                               return_dict_in_generate=True)
    layers = out.past_key_values.layers
    held = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    cfg.data.max_length = layers[0].keys.shape[2]  # the tokens cached: prompt and completion but its last
    plan = plan_memory(cfg, **grpo.planned(cfg))
    assert plan.sampling == held > 0
    assert "batch 6 × max_length" in plan.tokens and "logits at 5 answer tokens" in plan.tokens
    assert plan_memory(cfg, **sft.planned(cfg)).sampling == 0


def test_prompts_longer_than_max_length_are_dropped_with_a_warning(tiny_paligemma, shapes_data, tmp_path):
    """collate's prompts: a row whose prompt (image tokens included) is over data.max_length is
    left out, named in a warning; the others keep their rows and numbers in order."""
    from minivlm.build import load_processor
    from minivlm.data import load_split
    from minivlm.models import paligemma
    from minivlm.objectives import grpo

    cfg = grpo_config(tiny_paligemma, shapes_data, tmp_path)
    ds, processor = load_split(cfg.data, "train"), load_processor(cfg)
    whole = grpo.collate(ds, [0, 1, 2], cfg.data, paligemma, processor)
    lengths = whole["inputs"]["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1, "the shapes questions differ in length"
    cfg.data.max_length = min(lengths)
    with pytest.warns(UserWarning, match="dropped sample"):
        kept = grpo.collate(ds, [0, 1, 2], cfg.data, paligemma, processor)
    survivors = [i for i, n in zip([0, 1, 2], lengths) if n <= min(lengths)]
    assert kept["numbers"] == survivors and len(kept["inputs"]["input_ids"]) == len(survivors)
    assert kept["prompts"] == [whole["prompts"][i] for i in survivors]


def sampled_and_scored_agree(cfg, built, inputs: dict, group: int) -> dict:
    """grpo.sample's completions of `inputs` are generate's own (one encoding of each prompt's media,
    no image or video token sampled), and completion_log_probs on grpo.scoring_batch gives the
    log-probabilities they were drawn from; the scoring batch, returned."""
    from minivlm.objectives import grpo

    torch.manual_seed(0)
    sampled, ended = grpo.sample(cfg, built, inputs, group, 1.0, 1.0, 5)
    scored = grpo.scoring_batch(inputs, sampled, ended, group, grpo.answer_token_types(built))
    media = [built.processor.image_token_id, getattr(built.processor, "video_token_id", None)]
    torch.manual_seed(0)
    out = built.model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5,
                               num_return_sequences=group, output_logits=True, return_dict_in_generate=True,
                               suppress_tokens=[t for t in media if t is not None])
    completion = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert not torch.isin(completion, torch.tensor([t for t in media if t is not None])).any()
    assert torch.equal(sampled, completion)
    built.model.eval()
    logp, mask = grpo.completion_log_probs(cfg, built, scored, sampled.shape[1], group)
    drawn = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[mask], drawn[:, :logp.shape[1]][mask], atol=1e-4, rtol=1e-4)
    return scored


def test_two_image_prompts_are_sampled_once_and_scored_token_for_token(tiny_qwen2_5_vl, tmp_path):
    """Qwen2.5-VL prompts of two images each: grpo.collate places them at the markers, generate
    samples a group per prompt from one encoding of its images, and the scoring batch (the prompt's
    images and all, the batch listed three times end to end, which keeps every image with its row)
    gives the log-probabilities the sampler drew from."""
    from conftest import tiny_config, write_pair_rows
    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.objectives import grpo

    path = write_pair_rows(tmp_path / "pairs", 2)
    cfg = tiny_config(tiny_qwen2_5_vl, path, tmp_path / "run", family="qwen2_5_vl")
    cfg.data.image_column, cfg.data.image_root, cfg.data.max_images, cfg.data.eval_split = "images", str(path.parent), 2, ""
    built = build(cfg)
    prompts = grpo.collate(load_split(cfg.data, "train"), [0, 1], cfg.data, built.family, built.processor)
    inputs = prompts["inputs"]
    assert inputs["image_grid_thw"].shape[0] == 4 and prompts["prompts"][0] == "which is red, left <image> or right <image>"
    scored = sampled_and_scored_agree(cfg, built, inputs, 3)
    assert scored["image_grid_thw"].shape[0] == 12  # each prompt's two images, for each of its 3 completions


def test_a_video_prompt_is_sampled_once_and_scored_token_for_token(tiny_qwen2_5_vl, tmp_path):
    """The same with a 4-frame video a prompt (frame lists of different brightness): each completion
    is scored with its own prompt's video, its grid and frame rate listed once per completion."""
    from conftest import tiny_config
    from minivlm.build import build
    from minivlm.data import load_split
    from minivlm.objectives import grpo

    import datasets

    rows = datasets.Dataset.from_list([{"video": [Image.new("RGB", (32, 32), (60 * i + 10 * f,) * 3) for f in range(4)],
                                        "question": "<video> where", "answer": "left"} for i in range(2)])
    cfg = tiny_config(tiny_qwen2_5_vl, tmp_path, tmp_path / "run", family="qwen2_5_vl")
    cfg.data.video_column, cfg.data.video_frames, cfg.data.eval_split = "video", 4, ""
    cfg.model.video_processor = {"min_pixels": 64, "max_pixels": 32 * 32}
    built = build(cfg)
    inputs = grpo.collate(rows, [0, 1], cfg.data, built.family, built.processor)["inputs"]
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]] * 2
    scored = sampled_and_scored_agree(cfg, built, inputs, 3)
    assert scored["video_grid_thw"].shape[0] == 6 and scored["second_per_grid_ts"].shape[0] == 6
    torch.testing.assert_close(scored["pixel_values_videos"], torch.cat([inputs["pixel_values_videos"]] * 3))
