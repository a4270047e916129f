"""minivlm/packing.py: a micro-batch's samples end to end in one row give each sample the
log-probabilities and gradients of its padded row, for every family that packs (M-RoPE's
positions restarted per sample included); the loss per answer token of a window equals the
padded one for SFT and DPO; the families that cannot pack, and GRPO, are refused in one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import random_b, tiny_config, weighted_log_probs_and_grads
from minivlm.batches import answer_positions, answer_targets
from minivlm.build import build
from minivlm.config import ConfigError, validate
from minivlm.logprobs import answer_log_probs
from minivlm.models import FAMILIES, get_family
from minivlm.objectives import dpo, sft
from minivlm.packing import pack
from minivlm.plan import plan_memory

PACKING = [name for name in FAMILIES if get_family(name).PACKING]
IMAGES = [[Image.new("RGB", (32, 32), (200, 40, 40))], [Image.new("RGB", (64, 32), (40, 40, 200))],
          [Image.new("RGB", (32, 48), (40, 200, 40))]]
DIALOGS = [[("what color is the shape", "red")], [("where is it", "top left")], [("what color", "green green green")]]


def built_for(path, tmp_path, family: str, **train):
    """The tiny model with LoRA, its B matrices random."""
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family, **train)
    built = build(cfg)
    random_b(built.model)
    return cfg, built


def log_probs_and_grads(cfg, built, batch: dict, packing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg.data.packing = packing
    return weighted_log_probs_and_grads(cfg, built, batch)


@pytest.mark.parametrize("family", PACKING)
def test_packed_rows_give_each_sample_its_padded_values_and_gradients(family, request, tmp_path):
    cfg, built = built_for(request.getfixturevalue(f"tiny_{family}"), tmp_path, family)
    batch = built.family.training_batch(built.processor, IMAGES, DIALOGS)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padding to leave out
    packed = pack(built, batch)
    assert packed["input_ids"].shape == (1, lengths.sum()) and "attention_mask" not in packed
    padded, padded_grads = log_probs_and_grads(cfg, built, batch, False)
    rows = []  # what the decoder's embedding reads: one row of every real token, when packed
    embed = next(m for n, m in built.model.named_modules() if n.endswith(("embed_tokens", "wte")))
    hook = embed.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    joined, grads = log_probs_and_grads(cfg, built, batch, True)
    hook.remove()
    assert rows[0] == (1, lengths.sum())
    torch.testing.assert_close(joined, padded, rtol=1e-4, atol=1e-5)
    assert grads.keys() == padded_grads.keys() and padded_grads
    for name in grads:
        torch.testing.assert_close(grads[name], padded_grads[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_without_restarted_positions_the_samples_would_mix(family, request, tmp_path):
    """The test above can fail: one row of the same tokens counted 0..n-1, as one long sample,
    gives the later samples other log-probabilities (they attend to the earlier ones). (Qwen keeps
    its per-sample M-RoPE rows: only the count that the mask reads runs on.)"""
    cfg, built = built_for(request.getfixturevalue(f"tiny_{family}"), tmp_path, family)
    batch = built.family.training_batch(built.processor, IMAGES, DIALOGS)
    padded, _ = log_probs_and_grads(cfg, built, batch, False)
    one = pack(built, batch)
    one["position_ids"] = one["position_ids"].clone()
    one["position_ids"][0] = torch.arange(one["input_ids"].shape[1])
    keep = batch["attention_mask"].bool()
    cfg.data.packing = False
    mixed = answer_log_probs(cfg, built, one, answer_positions(batch)[keep][None], answer_targets(batch)).detach()
    first = int(answer_positions(batch)[0].sum())
    torch.testing.assert_close(mixed[:first], padded[:first], rtol=1e-4, atol=1e-5)  # the first sample is alone
    assert (mixed[first:] - padded[first:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["idefics", "mllama"])
def test_cross_attention_families_cannot_pack_and_are_refused(family, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{family}")
    cfg, built = built_for(path, tmp_path, family)
    batch = built.family.training_batch(built.processor, [[image] for image, *_ in IMAGES][:2], DIALOGS[:2])
    padded, _ = log_probs_and_grads(cfg, built, batch, False)
    try:  # PACKING = False is earned: joined, its rows' images fail or mix up
        joined, _ = log_probs_and_grads(cfg, built, batch, True)
        assert joined.shape != padded.shape or (joined - padded).abs().max() > 1e-3
    except RuntimeError:
        pass
    cfg.data.packing = True
    for step in (lambda: build(cfg), lambda: plan_memory(cfg)):
        with pytest.raises(ConfigError, match=r"data.packing: .*cross-attention.*set data.packing = false.*qwen2_5_vl"):
            step()


def test_sft_window_loss_and_gradients_equal_packed_and_padded(tiny_qwen2_5_vl, tmp_path):
    """The loss per answer token of a window of two micro-batches, and its gradients, packed or not."""
    cfg, built = built_for(tiny_qwen2_5_vl, tmp_path, "qwen2_5_vl", grad_accum=2)
    window = [built.family.training_batch(built.processor, IMAGES[:2], DIALOGS[:2]),
              built.family.training_batch(built.processor, IMAGES[2:], DIALOGS[2:])]
    runs = {}
    for packing in (False, True):
        cfg.data.packing = packing
        built.model.zero_grad(set_to_none=True)
        loss, n, _ = sft.backward_window(cfg, built, built.model, window, torch.amp.GradScaler(enabled=False))
        runs[packing] = loss, n, {k: p.grad.clone() for k, p in built.model.named_parameters() if p.grad is not None}
    assert runs[True][:2] == pytest.approx(runs[False][:2], rel=1e-5)
    for name, grad in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_dpo_sequence_log_probs_equal_packed_and_padded(tiny_qwen2_5_vl, tmp_path):
    """DPO sums each row's tokens: the rows of a packed pair batch are told apart as before."""
    cfg, built = built_for(tiny_qwen2_5_vl, tmp_path, "qwen2_5_vl")
    chosen = [[(q, a)] for (q, a), in DIALOGS]
    rejected = [[(q, "blue")] for (q, _), in DIALOGS]
    batch = built.family.training_batch(built.processor, IMAGES + IMAGES, chosen + rejected)
    sums = {}
    for packing in (False, True):
        cfg.data.packing = packing
        sums[packing] = dpo.sequence_logps(cfg, built, batch).detach()
    assert sums[True].shape == (6,)
    torch.testing.assert_close(sums[True], sums[False], rtol=1e-4, atol=1e-5)


def test_packing_and_grouping_config_mistakes_are_named(tiny_paligemma, shapes_data, tmp_path):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.train.objective, cfg.data.packing = "grpo", True
    with pytest.raises(ConfigError, match=r"data.packing = True is for train.objective = \"sft\" and \"dpo\""):
        validate(cfg)
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=2)
    cfg.data.streaming, cfg.data.eval_samples, cfg.data.group_by_length = True, 8, True
    with pytest.raises(ConfigError, match=r"data.group_by_length = True needs every row's length"):
        validate(cfg)
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.data.length_column = "n"
    with pytest.raises(ConfigError, match=r"data.length_column = 'n' is read only with data.group_by_length"):
        validate(cfg)
