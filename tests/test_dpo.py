"""DPO (minivlm/objectives/dpo.py): the loss and its gradient against the formula and against TRL, the
reference model (adapters off, or a frozen SFT adapter), pairs in every family, preference data
in TRL's conversational layout, exact resume, and train.py end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaForConditionalGeneration

from minivlm.cli import train as train_cli
from conftest import ROOT, count_steps, crash_after_first_save, write_split
from minivlm.objectives import dpo
from minivlm.build import build, load_processor
from minivlm.checkpoint import load_adapter
from minivlm.config import ConfigError, from_dict, load_config
from minivlm.batches import collate
from minivlm.data import load_split
from minivlm.lora import LoRALinear, adapters_off
from minivlm.loop import train
from minivlm.objectives.sft import answer_loss_sum
from minivlm.models import get_family

PAIRS = {"answer_column": "chosen", "rejected_column": "rejected"}


@pytest.fixture(scope="module")
def prefs_data(tmp_path_factory):
    """Preference pairs as make_data.py --task prefs writes them: "caption" -> English (chosen) or Spanish."""
    out = tmp_path_factory.mktemp("shapes-prefs")
    write_split(out / "train", 12, seed=5, task="prefs")
    write_split(out / "test", 6, seed=6, task="prefs")
    return out


def dpo_config(model_dir, data_dir, output_dir, family="paligemma", four_bit=True, dropout=0.0, **train):
    return from_dict({
        "model": {"family": family, "name_or_path": str(model_dir), "dtype": "float32"},
        "quant": {"load_in_4bit": four_bit},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout},
        "data": {"dataset": str(data_dir), "eval_split": "test", "max_length": 64, **PAIRS},
        "train": {"objective": "dpo", "dpo_beta": 0.5, "output_dir": str(output_dir), "batch_size": 2,
                  "lr": 1e-3, "optimizer": "adamw", "device": "cpu", "max_new_tokens": 4, **train},
    })


def randomize_adapters(model, seed=0) -> None:
    """Non-zero B everywhere: the policy is then no longer the base model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def answer_logp(model, processor, family, image, prompt: str, answer: str) -> torch.Tensor:
    """log π(answer | image, prompt) from the full logits of a one-row batch: plain torch, no dpo.py."""
    batch = family.training_batch(processor, [[image]], [[(prompt, answer)]])
    labels = batch.pop("labels")[0, 1:]
    logps = torch.log_softmax(model(**batch).logits[0, :-1].float(), dim=-1)
    keep = labels != -100
    return logps[keep].gather(1, labels[keep].unsqueeze(1)).sum()


def base_logp(built, *args) -> torch.Tensor:
    """The same through the base model: the adapters' B zeroed for the call (not adapters_off, which
    is what is tested), then put back."""
    saved = {n: p.detach().clone() for n, p in built.model.named_parameters() if n.endswith("lora_B")}
    params = dict(built.model.named_parameters())
    with torch.no_grad():
        for n in saved:
            params[n].zero_()
        value = answer_logp(built.model, *args)
        for n, p in saved.items():
            params[n].copy_(p)
    return value


@pytest.mark.parametrize("four_bit", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2], ids=["dpo", "cdpo"])
def test_loss_and_gradient_equal_the_formula(tiny_paligemma, prefs_data, tmp_path, four_bit, label_smoothing):
    """Two micro-batches of pairs (3 + 2) through dpo.backward_window against eq. 7 computed pair by
    pair from full logits, the reference being the base (adapters' B zeroed)."""
    cfg = dpo_config(tiny_paligemma, prefs_data, tmp_path, four_bit=four_bit, dpo_label_smoothing=label_smoothing)
    built = build(cfg)
    randomize_adapters(built.model)
    ds = load_split(cfg.data, "train")
    groups = [[0, 1, 2], [3, 4]]
    batches = [dpo.collate_pairs(ds, g, cfg.data, built.family, built.processor) for g in groups]
    built.model.train()
    built.model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, pairs, rewards = dpo.backward_window(cfg, built, built.model, batches, scaler,
                                               dpo.reference_weights(cfg, built.model))
    ours = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert pairs == 5

    built.model.zero_grad(set_to_none=True)
    beta, eps = cfg.train.dpo_beta, label_smoothing
    losses, margins = [], []
    rows = [(built.processor, built.family, r["image"].convert("RGB"), r["question"], r["chosen"], r["rejected"])
            for r in (ds[i] for i in range(5))]
    # π_ref first, without gradient: zeroing B in place must not touch a graph that is still needed.
    ref = [(base_logp(built, *r[:4], r[4]), base_logp(built, *r[:4], r[5])) for r in rows]
    for r, (ref_chosen, ref_rejected) in zip(rows, ref):
        h = ((answer_logp(built.model, *r[:4], r[4]) - ref_chosen)
             - (answer_logp(built.model, *r[:4], r[5]) - ref_rejected))
        losses.append(-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h))  # eq. 7 (cDPO)
        margins.append(beta * h.detach())
    expected = torch.stack(losses).mean()
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert rewards["reward_margin"] == pytest.approx(torch.stack(margins).mean().item(), rel=1e-4, abs=1e-6)
    assert rewards["reward_accuracy"] == sum(m > 0 for m in margins) / 5
    assert 0 < rewards["reward_accuracy"] < 1 or abs(rewards["reward_margin"]) > 1e-3  # not a trivial point
    for n, p in built.model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6)


def trl_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing, loss_type):
    """TRL 1.16's DPOTrainer._compute_loss on given sequence log-probabilities: its `self` and model
    stubbed down to what that method reads (precomputed reference log-probs, one completion token per
    row whose log-prob is the whole sequence's)."""
    from trl import DPOTrainer

    logps = torch.cat([chosen, rejected]).unsqueeze(1)  # (2 × pairs, 1): batch is [chosen, rejected]
    rows = len(logps)
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros(rows, 1), mean_logits=torch.zeros(rows, 1),
                              is_top1=torch.zeros(rows, 1, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(rows, 2, dtype=torch.long), "attention_mask": torch.ones(rows, 2),
              "completion_mask": torch.tensor([[0, 1]] * rows), "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False), trainer._metrics


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_loss_equals_trls_on_the_same_log_probabilities(label_smoothing):
    """TRL as a test-only oracle. Its "sigmoid" loss is eq. 7; TRL 1.16 applies label smoothing only
    in other losses, of which "aot" sorts the log-ratio differences over the batch and then takes
    cDPO's loss: on one pair, sorting does nothing, so it is cDPO pair by pair."""
    g = torch.Generator().manual_seed(1)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    beta = 0.3
    ours_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(*ours_in, ref_chosen, ref_rejected, beta, label_smoothing)
    ours = losses.mean()
    ours.backward()

    theirs_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    if label_smoothing == 0:
        theirs, metrics = trl_loss(*theirs_in, ref_chosen, ref_rejected, beta, 0.0, "sigmoid")
        m = metrics["train"]
        assert chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"][0], rel=1e-6)
        assert rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"][0], rel=1e-6)
        assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(m["rewards/margins"][0], rel=1e-6)
        assert (chosen_rewards > rejected_rewards).float().mean().item() == m["rewards/accuracies"][0]
    else:
        theirs = sum(trl_loss(theirs_in[0][i:i + 1], theirs_in[1][i:i + 1], ref_chosen[i:i + 1],
                              ref_rejected[i:i + 1], beta, label_smoothing, "aot")[0] for i in range(6)) / 6
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    assert ours.item() != pytest.approx(math.log(2), abs=1e-3)  # far from the trivial point


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"init": "pissa"}, {"init": "olora"}, {"init": "loftq"}],
                         ids=["dora", "pissa", "olora", "loftq"])
def test_step_zero_is_log_2_for_every_lora_variant(lora, tiny_paligemma, prefs_data, tmp_path):
    """π_ref is the model before training for each variant on the 4-bit base: DoRA's m/‖W‖_c = 1,
    and for a start taken from W, adapters_off computes W_res + s·B₀A₀, not W_res alone."""
    cfg = dpo_config(tiny_paligemma, prefs_data, tmp_path)
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    built = build(cfg)
    batch = dpo.collate_pairs(load_split(cfg.data, "train"), [0, 1, 2, 3], cfg.data, built.family, built.processor)
    built.model.train()
    loss, _, rewards = dpo.backward_window(cfg, built, built.model, [batch],
                                           torch.amp.GradScaler("cpu", enabled=False), None)
    assert loss == pytest.approx(math.log(2), abs=1e-6) and rewards["reward_margin"] == 0


def test_adapters_off_is_the_base_model_and_step_zero_is_log_2(tiny_paligemma, prefs_data, tmp_path):
    """With adapters off, the policy's log-probabilities are the base model's (loaded on its own,
    without minivlm); with B = 0 (step 0), the loss is log 2 and every reward 0, dropout or not."""
    cfg = dpo_config(tiny_paligemma, prefs_data, tmp_path, four_bit=False, dropout=0.3)
    built = build(cfg)
    ds = load_split(cfg.data, "train")
    batch = dpo.collate_pairs(ds, [0, 1, 2, 3], cfg.data, built.family, built.processor)
    built.model.train()
    loss, pairs, rewards = dpo.backward_window(cfg, built, built.model, [batch],
                                               torch.amp.GradScaler("cpu", enabled=False), None)
    assert pairs == 4 and loss == pytest.approx(math.log(2), abs=1e-7)
    assert rewards == {"rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}

    plain = PaliGemmaForConditionalGeneration.from_pretrained(tiny_paligemma, dtype=torch.float32).eval()
    with torch.no_grad():
        base = dpo.sequence_logps(cfg, dataclasses.replace(built, model=plain), batch)
        randomize_adapters(built.model)
        built.model.eval()
        adapted = dpo.sequence_logps(cfg, built, batch)
        with adapters_off(built.model):
            off = dpo.sequence_logps(cfg, built, batch)
    torch.testing.assert_close(off, base, rtol=1e-6, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do change the model
    assert all(m.enabled for m in built.model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(RuntimeError), adapters_off(built.model):
        raise RuntimeError
    assert all(m.enabled for m in built.model.modules() if isinstance(m, LoRALinear))  # back on after an error

    # Held-out before training: what the base prefers, pair by pair, and rewards of 0.
    fresh = build(cfg)
    scores = dpo.held_out(cfg, fresh, load_split(cfg.data, "test"), dpo.reference_weights(cfg, fresh.model))
    test = load_split(cfg.data, "test")
    test_batch = dpo.collate_pairs(test, list(range(len(test))), cfg.data, fresh.family, fresh.processor)
    with torch.no_grad():
        logps = dpo.sequence_logps(cfg, dataclasses.replace(fresh, model=plain), test_batch)
    n = len(test)
    assert scores["preference_accuracy"] == pytest.approx((logps[:n] > logps[n:]).float().mean().item())
    assert scores["dpo_loss"] == pytest.approx(math.log(2), abs=1e-7) and scores["reward_margin"] == 0


def save_sft_adapter(built, out) -> None:
    """What an SFT run leaves: every trainable tensor, here random, in <out>/adapter.safetensors."""
    randomize_adapters(built.model, seed=7)
    out.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in built.model.named_parameters() if p.requires_grad},
              out / "adapter.safetensors")


def test_init_from_an_sft_adapter_makes_it_the_frozen_reference(tiny_paligemma, prefs_data, tmp_path):
    sft = tmp_path / "sft"
    save_sft_adapter(build(dpo_config(tiny_paligemma, prefs_data, tmp_path)), sft)
    cfg = dpo_config(tiny_paligemma, prefs_data, tmp_path, init_from=str(sft))
    built = build(cfg)
    load_adapter(sft, built.model, partial=True)  # as train.py starts a run
    weights = dpo.reference_weights(cfg, built.model)
    batch = dpo.collate_pairs(load_split(cfg.data, "train"), [0, 1, 2], cfg.data, built.family, built.processor)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    built.model.train()
    loss, _, rewards = dpo.backward_window(cfg, built, built.model, [batch], scaler, weights)
    assert loss == pytest.approx(math.log(2), abs=1e-7) and rewards["reward_margin"] == 0  # π = π_ref at step 0
    with torch.no_grad():
        sft_logps = dpo.sequence_logps(cfg, built, batch)
        with adapters_off(built.model):
            base_logps = dpo.sequence_logps(cfg, built, batch)
    assert (sft_logps - base_logps).abs().max() > 1e-2  # the SFT adapter is not the base

    randomize_adapters(built.model, seed=8)  # "trained"
    trained = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    with dpo.reference(built.model, weights):
        ref_logps = dpo.sequence_logps(cfg, built, batch)
    torch.testing.assert_close(ref_logps, sft_logps, rtol=0, atol=0)
    for n, p in built.model.named_parameters():  # the trained values are back, bit for bit
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    assert built.model.training  # and so is training mode

    partial = tmp_path / "partial"
    partial.mkdir()
    saved = load_file(sft / "adapter.safetensors")
    save_file({k: v for k, v in saved.items() if "layers.0." not in k}, partial / "adapter.safetensors")
    cfg.train.init_from = str(partial)
    with pytest.raises(ConfigError, match="lacks .* trainable tensors .* the \\[lora\\] config it was trained with"):
        dpo.reference_weights(cfg, built.model)


def test_the_reference_and_held_out_pairs_are_dropout_free(tiny_paligemma, prefs_data, tmp_path):
    """With lora.dropout = 0.5 and the model in training mode: π_ref (an SFT adapter) is one fixed
    function, the eval-mode forward of a second model holding that adapter, in the reference
    block and inside a training window, where only the policy draws masks; held-out figures are
    those of eval-mode forwards too; and training mode is back after each."""
    sft = tmp_path / "sft"
    save_sft_adapter(build(dpo_config(tiny_paligemma, prefs_data, tmp_path, four_bit=False)), sft)
    cfg = dpo_config(tiny_paligemma, prefs_data, tmp_path, four_bit=False, dropout=0.5, init_from=str(sft))
    built, frozen = build(cfg), build(cfg)
    load_adapter(sft, frozen.model, partial=True)
    frozen.model.eval()
    weights = dpo.reference_weights(cfg, built.model)
    randomize_adapters(built.model, seed=8)  # the policy, "trained" away from the reference
    ds = load_split(cfg.data, "train")
    batch = dpo.collate_pairs(ds, [0, 1, 2], cfg.data, built.family, built.processor)
    with torch.no_grad():
        expected_ref = dpo.sequence_logps(cfg, frozen, batch)

    built.model.train()
    with dpo.reference(built.model, weights):
        ref = dpo.sequence_logps(cfg, built, batch)
    torch.testing.assert_close(ref, expected_ref, rtol=1e-6, atol=1e-5)
    assert built.model.training

    # In a window: the reference forward draws no mask, so the policy's masks are the ones drawn
    # right after the RNG state at the window's start.
    rng = torch.get_rng_state()
    _, _, rewards = dpo.backward_window(cfg, built, built.model, [batch], torch.amp.GradScaler("cpu", enabled=False),
                                        weights)
    torch.set_rng_state(rng)
    with torch.no_grad():
        policy = dpo.sequence_logps(cfg, built, batch)
    chosen = cfg.train.dpo_beta * (policy[:3] - expected_ref[:3])
    rejected = cfg.train.dpo_beta * (policy[3:] - expected_ref[3:])
    assert rewards["rewards_chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5, abs=1e-6)
    assert rewards["reward_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5, abs=1e-6)

    test = load_split(cfg.data, "test")
    scores = dpo.held_out(cfg, built, test, weights)
    assert built.model.training
    pairs = dpo.collate_pairs(test, list(range(len(test))), cfg.data, built.family, built.processor)
    n = len(test)
    built.model.eval()
    with torch.no_grad():
        logps, ref = dpo.sequence_logps(cfg, built, pairs), dpo.sequence_logps(cfg, frozen, pairs)
    margin = cfg.train.dpo_beta * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))
    assert scores["reward_margin"] == pytest.approx(margin.mean().item(), rel=1e-5, abs=1e-6)
    assert scores["preference_accuracy"] == pytest.approx((logps[:n] > logps[n:]).float().mean().item())


def test_resume_n_plus_n_equals_2n(tiny_paligemma, prefs_data, tmp_path, monkeypatch):
    """A DPO run from an SFT adapter (the reference read again on resume), killed after its step-3
    save and resumed, ends bit-identical to an unbroken one: adapters and optimizer state."""
    sft = tmp_path / "sft"
    save_sft_adapter(build(dpo_config(tiny_paligemma, prefs_data, tmp_path)), sft)

    def run(out, resume=None):
        cfg = dpo_config(tiny_paligemma, prefs_data, out, dropout=0.1, init_from=str(sft), grad_accum=2,
                         max_steps=6, save_every=3, warmup_steps=1, lr=5e-3, optimizer="adamw_8bit")
        built = build(cfg)
        if resume is None:
            load_adapter(sft, built.model, partial=True)
        return train(cfg, built, dpo, load_split(cfg.data, "train"), resume=resume)

    run(tmp_path / "full")
    crash_after_first_save(monkeypatch, lambda: run(tmp_path / "split"))
    assert json.loads((tmp_path / "split/last/state.json").read_text())["step"] == 3
    trained = count_steps(monkeypatch, dpo)
    run(tmp_path / "split", resume=tmp_path / "split/last")
    assert len(trained) == 3  # steps 4-6: it went on from its save
    for name in ("adapter", "state"):
        a = load_file(tmp_path / f"full/last/{name}.safetensors")
        b = load_file(tmp_path / f"split/last/{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    sft_weights, trained = load_file(sft / "adapter.safetensors"), load_file(tmp_path / "full/last/adapter.safetensors")
    assert all(not torch.equal(trained[k], sft_weights[k]) for k in sft_weights)  # it trained, every adapter
    log = [json.loads(line) for line in (tmp_path / "split/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(r["pairs"] == 4 and {"rewards_chosen", "reward_margin", "reward_accuracy"} <= r.keys() for r in log)


@pytest.mark.parametrize("name", ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2"])
def test_pairs_carry_each_familys_answer_mask(name, prefs_data, tmp_path, request):
    """A pair batch's chosen and rejected log-probabilities are, row by row, minus the SFT loss of
    the same answer in an SFT batch: the same answer tokens, found by the family's own label mask."""
    cfg = dpo_config(request.getfixturevalue(f"tiny_{name}"), prefs_data, tmp_path, family=name)
    built = build(cfg)
    randomize_adapters(built.model)
    built.model.eval()
    ds = load_split(cfg.data, "train")
    batch = dpo.collate_pairs(ds, [0, 1, 2], cfg.data, built.family, built.processor)
    with torch.no_grad():
        logps = dpo.sequence_logps(cfg, built, batch)
        for column, half in (("chosen", logps[:3]), ("rejected", logps[3:])):
            sft = dataclasses.replace(cfg.data, answer_column=column, rejected_column="")
            expected = [-answer_loss_sum(cfg, built, collate(ds, [i], sft, built.family, built.processor)).item()
                        for i in range(3)]
            assert half.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert (logps[:3] != logps[3:]).all()


def rlaif_v_rows(images: list[Image.Image], rows: list[tuple]) -> datasets.Dataset:
    """HuggingFaceH4/rlaif-v_formatted's layout: images in a list, prompt and answers as chat messages."""
    def message(role, text, image=False):
        return [{"role": role, "content": ([{"type": "image", "text": None}] if image else [])
                 + [{"type": "text", "text": text}]}]
    return datasets.Dataset.from_dict({
        "images": [[im] for im in images],
        "prompt": [message("user", q, image=True) for q, _, _ in rows],
        "chosen": [message("assistant", c) if c is not None else None for _, c, _ in rows],
        "rejected": [message("assistant", r) if r is not None else None for *_, r in rows],
    })


def test_rlaif_v_layout_is_read_and_bad_pairs_skipped(tiny_smolvlm, tmp_path):
    images = [Image.new("RGB", (32, 32), (40 * i, 100, 200)) for i in range(4)]
    rlaif_v_rows(images, [("caption", "red circle top left", "circulo rojo arriba izquierda"),
                          ("caption", "blue square", None),  # no rejected answer
                          ("caption", "green", "green"),  # nothing to prefer
                          ("where is the shape", "top right", "bottom left")]).to_parquet(tmp_path / "prefs.parquet")
    cfg = from_dict({"model": {"family": "smolvlm", "name_or_path": str(tiny_smolvlm), "dtype": "float32"},
                     "data": {"dataset": str(tmp_path / "prefs.parquet"), "image_column": "images",
                              "question_column": "prompt", **PAIRS, "max_length": 512},
                     "train": {"objective": "dpo", "device": "cpu"}})
    ds = load_split(cfg.data, "train")
    processor = load_processor(cfg)
    with pytest.warns(UserWarning) as caught:
        batch = dpo.collate_pairs(ds, [0, 1, 2, 3], cfg.data, get_family("smolvlm"), processor)
    reasons = " ".join(str(w.message) for w in caught)
    assert "row 1" in reasons and "null" in reasons and "row 2" in reasons and "nothing to prefer" in reasons
    tok = processor.tokenizer
    texts = [tok.decode(row[row != -100]) for row in batch["labels"]]
    assert texts == ["red circle top left <end_of_utterance>", "top right <end_of_utterance>",
                     "circulo rojo arriba izquierda <end_of_utterance>", "bottom left <end_of_utterance>"]
    prompts = tok.batch_decode(batch["input_ids"][:2])
    assert "caption" in prompts[0] and "where is the shape" in prompts[1] and "{" not in prompts[0]

    cfg.data.rejected_column = "dispreferred"
    with pytest.raises(ConfigError, match=r"has no column\(s\) \['dispreferred'\]"):
        load_split(cfg.data, "train")


@pytest.mark.parametrize("change, message", [
    ({"data": {"rejected_column": ""}}, "data.rejected_column = '' is empty, and train.objective = \"dpo\" needs it"),
    ({"train": {"dpo_beta": 0}}, "train.dpo_beta = 0.0 must be > 0"),
    ({"train": {"dpo_label_smoothing": 0.5}}, r"train.dpo_label_smoothing = 0.5 must be in \[0, 0.5\)"),
    ({"data": {"conversations_column": "conversations"}}, "compares two answers to one prompt"),
    ({"lora": {"train_modules": ["multi_modal_projector"]}}, "lora.train_modules .* needs train.init_from"),
    ({"train": {"beta": 0.1}}, "unknown key train.beta; did you mean 'dpo_beta'"),
    ({"train": {"objective": "ppo"}}, r"train.objective = 'ppo' is not one of \['sft', 'dpo', 'grpo'\]"),
])
def test_bad_dpo_config_is_one_clear_error(change, message):
    raw = {"data": {"rejected_column": "rejected"}, "train": {"objective": "dpo"}}
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_dpo_demo_config_end_to_end(tiny_paligemma, prefs_data, tmp_path):
    """configs/dpo_demo.toml on the tiny model through train.py: held-out preference figures before
    and after in metrics.json, rewards in the step log, a checkpoint like an SFT run's."""
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={prefs_data}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=3", "train.eval_every=1"]
    metrics = train_cli.main(["--config", str(ROOT / "configs/dpo_demo.toml"), *sum((["--set", s] for s in sets), [])])
    saved = json.loads((tmp_path / "run/metrics.json").read_text())
    assert saved == pytest.approx(metrics, nan_ok=True)
    assert saved["dpo_loss_before"] == pytest.approx(math.log(2), abs=1e-6) and saved["reward_margin_before"] == 0
    assert saved["reward_margin_after"] != 0 and {"accuracy_before", "accuracy_after"} <= saved.keys()
    # Preference accuracy before and after: the base's and the trained adapter's own ranking of the
    # 6 held-out pairs, log π(chosen) > log π(rejected), from eval-mode forwards here.
    cfg = load_config(str(ROOT / "configs/dpo_demo.toml"), sets)
    built, test = build(cfg), load_split(cfg.data, "test")
    pairs = dpo.collate_pairs(test, list(range(6)), cfg.data, built.family, built.processor)
    built.model.eval()
    for when in ("before", "after"):
        if when == "after":
            load_adapter(tmp_path / "run/last", built.model)
        with torch.no_grad():
            logps = dpo.sequence_logps(cfg, built, pairs)
        assert saved[f"preference_accuracy_{when}"] == (logps[:6] > logps[6:]).sum().item() / 6, when
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    evals, steps = [r for r in log if "val_loss" in r], [r for r in log if "loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and all("preference_accuracy" in r for r in evals)
    assert [r["step"] for r in steps] == [1, 2] and all(r["pairs"] == 3 for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[1]["reward_margin"] != 0
    assert set(load_file(tmp_path / "run/last/adapter.safetensors")) == {
        n for n, p in built.model.named_parameters() if p.requires_grad}


def test_smolvlm_seed_sft_then_dpo_on_a_tiny_smolvlm(tiny_smolvlm, tmp_path):
    """configs/smolvlm.toml, then configs/smolvlm_dpo.toml from its adapter (bf16, checkpointing, the
    seed's 4 × 16 geometry, RLAIF-V's layout), paths overridden: the first DPO step's loss is log 2,
    since the policy starts as the SFT adapter, which is also the reference."""
    sft_data = tmp_path / "chartqa"
    write_split(sft_data / "train", 8, seed=4)
    meta = sft_data / "train/metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({"file_name": r["file_name"], "query": r["question"], "label": [r["answer"]]})
                            + "\n" for r in rows))
    common = [f"model.name_or_path={tiny_smolvlm}", 'data.eval_split=""', "train.max_steps=1", "train.device=cpu"]
    train_cli.main(["--config", str(ROOT / "configs/smolvlm.toml"), *sum((["--set", s] for s in [
        *common, f"data.dataset={sft_data}", f"train.output_dir={tmp_path / 'sft'}"]), [])])

    images = [Image.new("RGB", (48, 32), (30 * i, 200, 60)) for i in range(6)]
    rlaif_v_rows(images, [("caption", "red circle top left", "blue square bottom right")] * 6).to_parquet(
        tmp_path / "rlaif.parquet")
    metrics = train_cli.main(["--config", str(ROOT / "configs/smolvlm_dpo.toml"), *sum((["--set", s] for s in [
        *common, f"data.dataset={tmp_path / 'rlaif.parquet'}", f"train.init_from={tmp_path / 'sft/last'}",
        f"train.output_dir={tmp_path / 'dpo'}"]), [])])
    log = [json.loads(line) for line in (tmp_path / "dpo/log.jsonl").read_text().splitlines()]
    assert metrics["steps"] == 1 and log[0]["pairs"] == 6 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    state = json.loads((tmp_path / "dpo/last/state.json").read_text())["config"]["train"]
    assert state["bf16"] and state["gradient_checkpointing"] and (state["batch_size"], state["grad_accum"]) == (4, 16)
    sft, dpo_adapter = (load_file(tmp_path / f"{run}/last/adapter.safetensors") for run in ("sft", "dpo"))
    assert sft.keys() == dpo_adapter.keys() and any(not torch.equal(sft[k], dpo_adapter[k]) for k in sft)


def test_resume_refuses_another_reference_model():
    """train.init_from may change on an SFT resume (it only sets the start), not on a DPO one,
    where it is the reference model: another one is another loss."""
    from minivlm.config import resume_conflicts
    from minivlm.config import to_dict

    def config(objective, init_from):
        raw = {"data": {"rejected_column": "rejected"}, "train": {"objective": objective, "init_from": init_from}}
        return to_dict(from_dict(raw))

    assert resume_conflicts(config("sft", "runs/a/last"), config("sft", "runs/b/last")) == []
    assert resume_conflicts(config("dpo", "runs/a/last"), config("dpo", "runs/b/last")) == [
        "train.init_from: 'runs/a/last' -> 'runs/b/last'"]


def test_a_pair_takes_its_images_once_for_both_answers(tiny_qwen2_5_vl, tmp_path):
    """Two-image preference rows: the chosen and the rejected row each hold both images, where
    the question's markers put them, and the labels are each row's own answer."""
    from conftest import write_pair_rows
    from minivlm.models import qwen2_5_vl

    path = write_pair_rows(tmp_path / "pairs", 2)
    cfg = dpo_config(tiny_qwen2_5_vl, tmp_path, tmp_path / "run", family="qwen2_5_vl")
    cfg.data = dataclasses.replace(cfg.data, dataset=str(path), image_column="images", image_root=str(path.parent),
                                   answer_column="answer", rejected_column="rejected", max_images=2)
    processor = qwen2_5_vl.load_processor(str(tiny_qwen2_5_vl))
    batch = dpo.collate_pairs(load_split(cfg.data, "train"), [0, 1], cfg.data, qwen2_5_vl, processor)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(qwen2_5_vl.END_OF_TURN)
    words = {w: tok("left" if w == "l" else "right", add_special_tokens=False)["input_ids"] + [end]
             for w in "lr"}
    assert [row[row != -100].tolist() for row in batch["labels"]] == [words["l"], words["r"], words["r"], words["l"]]
    assert batch["image_grid_thw"].shape[0] == 8  # 4 rows × 2 images
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (batch["input_ids"] == image).sum(1)
    assert torch.equal(per_row[:2], per_row[2:]) and (per_row > 0).all()  # a pair's rows: the same images
