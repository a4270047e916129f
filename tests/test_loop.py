"""The loop: token-normalised accumulation, exact resume, masked batches, the schedule."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import crash_after_first_save, tiny_config
from minivlm.build import build
from minivlm.config import TrainConfig
from minivlm.data import collate, epoch_batches, load_split
from minivlm import loop
from minivlm.loop import answer_loss_sum, backward_window, train
from minivlm.models import paligemma
from minivlm.optim import lr_at
from minivlm.plot import plot_run
from minivlm.precision import logits_of


def grads_after(cfg, built, batches) -> dict[str, torch.Tensor]:
    built.model.train()  # transformers checkpoints only in training mode
    built.model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    backward_window(cfg, built, built.model, batches, scaler)
    return {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}


def test_batch4_accum1_equals_batch1_accum4(tiny_paligemma, shapes_data, tmp_path):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    built = build(cfg)
    with torch.no_grad():  # non-zero B, so A gets a gradient too
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ds = load_split(cfg.data, "train")
    # Answers of different lengths ("top left" is 2 words + EOS, "red" 1 + EOS): a mean of
    # per-micro-batch means would weigh them differently than one mean over all tokens.
    idx = [0, 1, 2, 3]
    assert len({len(a.split()) for a in ds[idx]["answer"]}) > 1
    one_batch = grads_after(cfg, built, [collate(ds, idx, cfg.data, paligemma, built.processor)])
    micro = [collate(ds, [i], cfg.data, paligemma, built.processor) for i in idx]
    accumulated = grads_after(cfg, built, micro)
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=1e-4, atol=1e-6)
    assert any(accumulated[n].abs().sum() > 0 for n in accumulated if "lora_A" in n)

    # The test can fail: averaging per-micro-batch means gives a different gradient.
    built.model.zero_grad(set_to_none=True)
    for b in micro:
        (answer_loss_sum(cfg, built, b) / (b["labels"][:, 1:] != -100).sum() / 4).backward()
    naive = {n: p.grad for n, p in built.model.named_parameters() if p.requires_grad}
    assert not all(torch.allclose(naive[n], one_batch[n], rtol=1e-3, atol=1e-6) for n in one_batch)


def test_resume_n_plus_n_equals_2n(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """A run killed right after its step-4 checkpoint, resumed, ends bit-identical to an unbroken run."""
    def cfg_for(out):
        # r=64 makes some adapters >= 4096 values, so bitsandbytes keeps their Adam moments in
        # 8 bits (with shared quantization maps): the state that is hardest to save and restore.
        # dropout > 0: the RNG state must be restored too.
        cfg = tiny_config(tiny_paligemma, shapes_data, out, optimizer="adamw_8bit", batch_size=2,
                          grad_accum=2, max_steps=8, warmup_steps=2, lr=5e-3, save_every=4)
        cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 64, 16.0, 0.1
        return cfg

    ds = load_split(cfg_for(tmp_path).data, "train")  # 24 samples = 6 steps per epoch: crosses an epoch
    train(cfg_for(tmp_path / "full"), build(cfg_for(tmp_path / "full")), ds)

    split = cfg_for(tmp_path / "split")
    crash_after_first_save(monkeypatch, lambda: train(split, build(split), ds))
    assert json.loads((tmp_path / "split/last/state.json").read_text())["step"] == 4
    train(cfg_for(tmp_path / "split"), build(cfg_for(tmp_path / "split")), ds, resume=tmp_path / "split/last")

    a = load_file(tmp_path / "full/last/adapter.safetensors")
    b = load_file(tmp_path / "split/last/adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_file(tmp_path / "full/last/state.safetensors")
    sb = load_file(tmp_path / "split/last/state.safetensors")
    assert sa.keys() == sb.keys() and any("state1" in k and sa[k].dtype == torch.uint8 for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # And the runs really trained: the adapters moved from B = 0.
    assert any(k.endswith("lora_B") and a[k].abs().sum() > 0 for k in a)
    log = [json.loads(line) for line in (tmp_path / "split/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))


def test_all_masked_batch_is_skipped_not_nan(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    original = paligemma.training_batch

    def masked(*args, **kwargs):
        batch = original(*args, **kwargs)
        batch["labels"][:] = -100
        return batch

    monkeypatch.setattr(paligemma, "training_batch", masked)
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=2)
    built = build(cfg)
    ds = load_split(cfg.data, "train")
    with pytest.warns(UserWarning, match="no answer tokens"):
        train(cfg, built, ds)
    for n, p in built.model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), n
            if "lora_B" in n:
                assert torch.count_nonzero(p) == 0, n  # no step was taken


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] < 0.02
    cfg.schedule = "linear"
    assert lr_at(12, 20, cfg) == pytest.approx(0.5)
    cfg.schedule = "constant"
    assert lr_at(19, 20, cfg) == 1.0


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False)])
def test_grad_scaler_only_with_fp16(tiny_paligemma, shapes_data, tmp_path, precision, scaled):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=2, **{precision: True})
    cfg.model.dtype = "float16" if precision == "fp16" else "bfloat16"
    result = train(cfg, build(cfg), load_split(cfg.data, "train"))
    assert torch.isfinite(torch.tensor(result["loss"]))
    scaler_state = json.loads((tmp_path / "last/state.json").read_text())["state"]["scaler"]
    assert ("scale" in scaler_state) == scaled


@pytest.mark.parametrize("dropout, shared", [(0.0, False), (0.3, False), (0.3, True)])
def test_activation_checkpointing_gives_every_adapter_the_same_gradient(tiny_paligemma, shapes_data, tmp_path,
                                                                        dropout, shared):
    """Recomputation in backward must draw the same dropout masks as the forward did (shared or not)."""
    grads = {}
    for checkpointing in (False, True):
        cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, gradient_checkpointing=checkpointing)
        cfg.lora.dropout, cfg.lora.shared_dropout = dropout, shared
        built = build(cfg)
        assert built.model.is_activation_checkpointing == checkpointing
        with torch.no_grad():
            for n, p in built.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        ds = load_split(cfg.data, "train")
        grads[checkpointing] = grads_after(cfg, built, [collate(ds, [0, 1, 2], cfg.data, paligemma, built.processor)])
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[True].items():
        assert g.abs().sum() > 0, name  # every adapter, in every layer, gets a gradient
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6)


def test_train_evaluate_train_on_4bit(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """Evaluation (loss, then generation in eval mode without grad) in the middle of training, on
    4-bit weights, and training goes on: the adapters keep moving after each evaluation."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=4, eval_every=2, lr=1e-2)
    built = build(cfg)
    snapshots = []
    real_evaluate = loop.evaluate

    def evaluate_and_snapshot(*args):
        snapshots.append({n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad})
        return real_evaluate(*args)

    monkeypatch.setattr(loop, "evaluate", evaluate_and_snapshot)
    train(cfg, built, load_split(cfg.data, "train"), eval_ds=load_split(cfg.data, "test"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["accuracy"] <= 1 for r in evals)
    after = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(after[n], snapshots[0][n]) for n in after)  # steps 3-4 trained after eval 1
    assert (tmp_path / "best/adapter.safetensors").is_file()
    png = plot_run(tmp_path, "accuracy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_validation_loss_reads_every_row_of_a_long_split(tiny_paligemma, tmp_path, monkeypatch):
    """50 rows in batches of 8, answers 1 to 9 words long: the loss is the per-token mean over every
    row, computed here one row at a time with plain torch."""
    from demo.shapes import VOCAB
    from PIL import Image

    data = tmp_path / "long-eval" / "test"
    data.mkdir(parents=True)
    rows = []
    for i in range(50):
        Image.new("RGB", (32, 32), (5 * i, 100, 200 - 3 * i)).save(data / f"{i:03d}.png")
        answer = " ".join(VOCAB[(i + k) % len(VOCAB)] for k in range(1 + i % 9))
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "question": "what shape is it", "answer": answer}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tiny_paligemma, data.parent, tmp_path / "run", batch_size=8)
    cfg.data.max_length = 128
    built = build(cfg)
    with torch.no_grad():  # a non-trivial adapter, so dropout-free eval mode matters
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ds = load_split(cfg.data, "test")

    read = []
    real_collate = loop.collate
    monkeypatch.setattr(loop, "collate", lambda ds, idx, *a: read.extend(idx) or real_collate(ds, idx, *a))
    ours = loop.validation_loss(cfg, built, ds)
    assert sorted(read) == list(range(50))

    built.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(50):
            batch = real_collate(ds, [i], cfg.data, paligemma, built.processor)
            labels = batch.pop("labels")[0, 1:]
            logits = built.model(**batch).logits[0, :-1]
            total += F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum").item()
            tokens += int((labels != -100).sum())
    assert tokens > 50 * 2  # answers really are of many lengths
    assert ours == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize("name", ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2"])
def test_lm_head_runs_only_at_answer_positions_with_the_full_logits_loss(name, shapes_data, tmp_path, request):
    cfg = tiny_config(request.getfixturevalue(f"tiny_{name}"), shapes_data, tmp_path, family=name)
    built = build(cfg)
    with torch.no_grad():  # non-zero B: the loss then depends on every adapter
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ds = load_split(cfg.data, "train")
    batch = collate(ds, [0, 1, 2], cfg.data, built.family, built.processor)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    lm_head = next(m for n, m in built.model.named_modules() if n.endswith("lm_head"))
    rows = []
    hook = lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))

    built.model.zero_grad(set_to_none=True)
    loss = answer_loss_sum(cfg, built, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert rows == [n_answer]  # not batch × seq rows
    hook.remove()

    # The same loss from the full (batch, seq, vocab) logits.
    built.model.zero_grad(set_to_none=True)
    logits, targets = logits_of(cfg, built, batch), batch["labels"][:, 1:]
    full = F.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100], reduction="sum")
    full.backward()
    assert logits.shape[1] == batch["input_ids"].shape[1] and logits.shape[1] * 3 > n_answer
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    for n, p in built.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_log_reports_tokens_per_second_counting_real_tokens(tiny_paligemma, shapes_data, tmp_path):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=3, batch_size=5)
    built = build(cfg)
    ds = load_split(cfg.data, "train")
    train(cfg, built, ds)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    windows = epoch_batches(len(ds), 5, cfg.train.seed, 0)[:3]
    batches = [collate(ds, w, cfg.data, paligemma, built.processor) for w in windows]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # image + text, never padding
    assert tokens < sum(b["input_ids"].numel() for b in batches)  # there was padding to leave out
    last = records[-1]
    assert last["tokens_per_s"] / last["samples_per_s"] == pytest.approx(tokens / 15, rel=1e-9)
    assert "mfu" not in last  # only on a GPU with a known peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_vision_tower_and_projector_keep_nothing_for_backward(tiny_paligemma, shapes_data, tmp_path,
                                                                     checkpointing):
    """Nothing before the first adapter needs a gradient, so no activation of the (frozen, float)
    vision tower and projector may still be held for backward when the forward is done; the
    decoder's are. (transformers' checkpointing made the tower's patch embeddings require grad,
    and the whole tower kept its activations: build.py turns that off.)"""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, gradient_checkpointing=checkpointing)
    built = build(cfg)
    built.model.train()
    saved = {"vision": [], "decoder": []}
    where = ["decoder"]
    for name in ("vision_tower", "multi_modal_projector"):
        module = built.model.get_submodule(f"model.{name}")
        module.register_forward_pre_hook(lambda *a: where.append("vision"))  # returns None
        module.register_forward_hook(lambda *a: where.pop() and None)  # None: keep the output

    def pack(t):
        saved[where[-1]].append(weakref.ref(t))
        return t

    batch = collate(load_split(cfg.data, "train"), [0, 1, 2], cfg.data, paligemma, built.processor)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = answer_loss_sum(cfg, built, batch)
    gc.collect()
    alive = {k: sum(t().numel() * t().element_size() for t in refs if t() is not None) for k, refs in saved.items()}
    assert alive["vision"] == 0
    assert alive["decoder"] > 0
    loss.backward()
