"""The loop: it learns, token-normalised accumulation, exact resume, masked batches, clipping, the
schedule, epochs, the validation loss in eval mode."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import count_steps, crash_after_first_save, tiny_config
from minivlm.build import build
from minivlm.config import TrainConfig
from minivlm.batches import collate
from minivlm.data import load_split
from minivlm.steps import epoch_batches
from minivlm import evaluate, loop
from minivlm.loop import train
from minivlm.objectives import sft
from minivlm.objectives.sft import answer_loss_sum, backward_window
from minivlm.models import paligemma
from minivlm.optim import build_optimizer, lr_at
from minivlm.plot import plot_run
from minivlm.precision import logits_of


def write_constant_answer_data(root, n: int = 8):
    """Every image, whatever its colour, answered "red": a task even the random tiny model learns
    in a few steps, so that a loop that climbs the loss cannot pass for one that learns."""
    from PIL import Image
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.new("RGB", (32, 32), (200, 20 + 10 * i, 30)).save(root / split / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "question": "what color is the shape", "answer": "red"}))
        (root / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def plain_loss(cfg, built, ds) -> tuple[float, int]:
    """(loss per answer token, answer tokens) over every row of `ds`, one row at a time, in eval
    mode, from the full logits with plain torch: what the loop's losses are checked against."""
    built.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            batch = collate(ds, [i], cfg.data, paligemma, built.processor)
            labels = batch.pop("labels")[0, 1:]
            logits = built.model(**batch).logits[0, :-1]
            total += F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum").item()
            tokens += int((labels != -100).sum())
    return total / tokens, tokens


def test_training_lowers_the_loss_and_teaches_the_answer(tiny_paligemma, tmp_path):
    """The random tiny model answers "" before; ten steps later every held-out answer is "red" (it
    gets there at step 7 of 10, measured) and the loss per answer token, measured here with plain
    torch in eval mode, has fallen by more than 8% (12.7% measured: 7.47 -> 6.52), at every
    evaluation. A sign error anywhere (loss, gradient, optimizer) would climb instead."""
    data = write_constant_answer_data(tmp_path / "red")
    cfg = tiny_config(tiny_paligemma, data, tmp_path / "run", max_steps=10, eval_every=2, lr=5e-3,
                      schedule="constant", batch_size=4)
    built = build(cfg)
    train_ds, test_ds = load_split(cfg.data, "train"), load_split(cfg.data, "test")

    before, scored = plain_loss(cfg, built, train_ds)[0], evaluate.evaluate(cfg, built, test_ds)
    assert scored["predictions"] == [""] * 8 and scored["score"] == 0.0
    train(cfg, built, sft, train_ds, eval_ds=test_ds, before=evaluate.scores(cfg, built, test_ds, sft, None))
    after = plain_loss(cfg, built, train_ds)[0]
    assert after < 0.92 * before, f"the loss per answer token went from {before:.4f} to {after:.4f}"
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(val) == 6 and all(b < a for a, b in zip(val, val[1:])), val
    assert [r["accuracy"] for r in log if "accuracy" in r][-1] == 1.0
    assert evaluate.evaluate(cfg, built, test_ds)["predictions"] == ["red"] * 8


def grads_after(cfg, built, batches) -> dict[str, torch.Tensor]:
    built.model.train()  # transformers checkpoints only in training mode
    built.model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    backward_window(cfg, built, built.model, batches, scaler)
    return {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}


def built_with_nonzero_b(cfg):
    """The built model with random LoRA B: at B = 0 (the init) A gets no gradient at all."""
    built = build(cfg)
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return built


def test_batch4_accum1_equals_batch1_accum4(tiny_paligemma, shapes_data, tmp_path):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    built = built_with_nonzero_b(cfg)
    ds = load_split(cfg.data, "train")
    # Answers of different lengths ("top left" is 2 words + EOS, "red" 1 + EOS): a mean of
    # per-micro-batch means would weigh them differently than one mean over all tokens.
    idx = [0, 1, 2, 3]
    assert len({len(a.split()) for a in ds[idx]["answer"]}) > 1
    batch = collate(ds, idx, cfg.data, paligemma, built.processor)
    one_batch = grads_after(cfg, built, [batch])
    # The gradient of the mean loss per answer token, from the full logits with plain torch: the
    # direction the optimizer is told to descend (a backward of -loss would flip every sign).
    built.model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    F.cross_entropy(built.model(**inputs).logits[:, :-1][targets != -100], targets[targets != -100]).backward()
    for n, p in built.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(one_batch[n], p.grad, rtol=1e-4, atol=1e-6)
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


@pytest.mark.parametrize("streaming,lora,data", [
    (False, {}, {}), (True, {}, {}), (False, {"use_dora": True}, {}), (False, {"init": "loftq"}, {}),
    (False, {}, {"group_by_length": True, "packing": True})], ids=["map", "stream", "dora", "loftq", "grouped"])
def test_resume_n_plus_n_equals_2n(tiny_paligemma, shapes_data, tmp_path, monkeypatch, streaming, lora, data):
    """A run killed right after its step-4 checkpoint, resumed, ends bit-identical to an unbroken run;
    reading a stream too (data.streaming), whose save says where to read on; with DoRA's magnitudes
    saved and restored, with LoftQ's start (W_res, B₀A₀) made again from W by the resumed build,
    and with batches grouped by length (the same grouping, from the lengths measured again) and packed."""
    def cfg_for(out):
        # r=64 makes some adapters >= 4096 values, so bitsandbytes keeps their Adam moments in
        # 8 bits (with shared quantization maps): the state that is hardest to save and restore.
        # dropout > 0: the RNG state must be restored too. A stream's steps are 5 rows, so the
        # save's position is mid-epoch (row 20) and step 5 runs on into the next epoch.
        cfg = tiny_config(tiny_paligemma, shapes_data, out, optimizer="adamw_8bit", batch_size=5 if streaming else 2,
                          grad_accum=1 if streaming else 2, max_steps=8, warmup_steps=2, lr=5e-3, save_every=4)
        cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 64, 16.0, 0.1
        cfg.data.streaming, cfg.data.eval_samples = streaming, 8
        for key, value in lora.items():
            setattr(cfg.lora, key, value)
        for key, value in data.items():
            setattr(cfg.data, key, value)
        return cfg

    # 24 samples = 6 steps per epoch: crosses an epoch
    ds = load_split(cfg_for(tmp_path).data, "train", streaming=streaming)
    train(cfg_for(tmp_path / "full"), build(cfg_for(tmp_path / "full")), sft, ds)

    split = cfg_for(tmp_path / "split")
    crash_after_first_save(monkeypatch, lambda: train(split, build(split), sft, ds))
    saved = json.loads((tmp_path / "split/last/state.json").read_text())
    assert saved["step"] == 4 and saved["loop"].get("stream") == ({"epoch": 0, "row": 20, "read": 20} if streaming else None)
    trained = count_steps(monkeypatch, sft)
    train(cfg_for(tmp_path / "split"), build(cfg_for(tmp_path / "split")), sft, ds, resume=tmp_path / "split/last")
    assert len(trained) == 4  # steps 5-8: it went on from its save

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
    assert any(k.endswith("lora_magnitude") for k in a) == bool(lora.get("use_dora"))
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
        train(cfg, built, sft, ds)
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
    cfg.schedule = "linear"  # from lr at the end of warmup down to 0 at the last step
    assert [lr_at(s, 20, cfg) for s in (4, 8, 12, 20)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    cfg.schedule = "constant"
    assert lr_at(19, 20, cfg) == 1.0


@pytest.mark.parametrize("max_grad_norm, steps", [(0.05, {"max_steps": 4}), (0.0, {"epochs": 2})])
def test_the_optimizer_steps_with_the_clipped_gradient_and_the_scheduled_lr(tiny_paligemma, shapes_data, tmp_path,
                                                                           monkeypatch, max_grad_norm, steps):
    """Spied on at optimizer.step: the gradient it applies has norm min(‖g‖, max_grad_norm) (the
    tiny run's ‖g‖ is 0.2-0.6, so 0.05 clips every step; 0 never does), the log holds ‖g‖ before
    clipping, as the Trainer's does, and the learning rate is lr_at's for the run's length:
    max_steps, or epochs × steps per epoch (24 samples / batch 4 = 6)."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, warmup_steps=2, max_grad_norm=max_grad_norm, **steps)
    built = build(cfg)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    before_clip, applied, lrs = [], [], []
    real_window, real_optimizer = sft.backward_window, loop.build_optimizer

    def window(*args, **kwargs):
        out = real_window(*args, **kwargs)
        before_clip.append(torch.nn.utils.get_total_norm([p.grad for p in trainable]).item())
        return out

    def optimizer(*args):
        opt = real_optimizer(*args)
        real_step = opt.step

        def step(*a, **k):
            applied.append(torch.nn.utils.get_total_norm([p.grad for p in trainable]).item())
            lrs.append(opt.param_groups[0]["lr"])
            return real_step(*a, **k)
        opt.step = step
        return opt

    monkeypatch.setattr(sft, "backward_window", window)
    monkeypatch.setattr(loop, "build_optimizer", optimizer)
    result = train(cfg, built, sft, load_split(cfg.data, "train"))
    total = steps.get("max_steps") or 6 * steps["epochs"]
    assert result["step"] == total and len(applied) == total
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [s // 6 for s in range(total)]
    assert [r["grad_norm"] for r in log] == pytest.approx(before_clip, rel=1e-6)
    expected = [min(g, max_grad_norm) if max_grad_norm else g for g in before_clip]
    assert applied == pytest.approx(expected, rel=1e-5), f"stepped with norms {applied}, not min(‖g‖, {max_grad_norm})"
    assert min(before_clip) > 0.1  # so 0.05 really clipped, every step
    assert lrs == pytest.approx([lr_at(s, total, cfg.train) for s in range(total)], rel=1e-12)
    assert [r["lr"] for r in log] == pytest.approx(lrs, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_lora_plus_steps_every_b_at_ratio_times_lr_in_the_groups_peft_makes(optimizer):
    """train.lora_plus_ratio = 16: every lora_B in a group of its own, the rest at lr, as PEFT's
    create_loraplus_optimizer groups the same model's adapters; and the loop's scheduled lr
    reaches B's group times 16 at each step."""
    import copy
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from minivlm.lora import inject_lora

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False))
    ours = copy.deepcopy(net)
    inject_lora(ours, ["0", "2"], [], r=2, alpha=4, dropout=0.0)
    opt = build_optimizer(ours, TrainConfig(optimizer=optimizer, lr=1e-3, lora_plus_ratio=16))
    names = {id(p): n for n, p in ours.named_parameters()}
    scales = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_names = {id(p): n.removeprefix("base_model.model.").removesuffix(".default.weight")
                  for n, p in peft_model.named_parameters()}
    assert scales == {peft_names[id(p)]: g["lr"] / 1e-3 for g in theirs.param_groups for p in g["params"]}
    assert sorted(scales.values()) == [1.0, 1.0, 16.0, 16.0]
    for p in ours.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    loop.Run.optimizer_step(SimpleNamespace(optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False)), 5e-4)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-4, 8e-3])
    plain = build_optimizer(ours, TrainConfig(optimizer=optimizer, lr=1e-3))
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_weight_decay_and_betas_reach_the_optimizer(optimizer):
    """Decoupled weight decay (AdamW): with a zero gradient, Adam's update is 0 and a step only
    shrinks each weight by lr · weight_decay, for fp32 and 8-bit Adam state alike (the 4096-value
    tensor gets 8-bit state)."""
    model = torch.nn.ModuleList([torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(8, 8, bias=False)])
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5, betas=[0.8, 0.95])
    opt = build_optimizer(model, cfg)
    assert [(g["weight_decay"], tuple(g["betas"])) for g in opt.param_groups] == [(0.5, (0.8, 0.95))]
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 1 - 0.1 * 0.5))
    # "adamw" keeps fp32 moments; the 8-bit optimizer keeps its 4096-value tensor's in 8 bits.
    state = opt.state[model[0].weight]
    assert (state["exp_avg"].dtype if optimizer == "adamw" else state["state1"].dtype) == (
        torch.float32 if optimizer == "adamw" else torch.uint8)


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False)])
def test_grad_scaler_only_with_fp16(tiny_paligemma, shapes_data, tmp_path, precision, scaled):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path, max_steps=2, **{precision: True})
    cfg.model.dtype = "float16" if precision == "fp16" else "bfloat16"
    result = train(cfg, build(cfg), sft, load_split(cfg.data, "train"))
    assert torch.isfinite(torch.tensor(result["loss"]))
    scaler_state = json.loads((tmp_path / "last/state.json").read_text())["state"]["scaler"]
    assert ("scale" in scaler_state) == scaled


def test_fp16_clips_and_logs_the_unscaled_gradient(tiny_paligemma, shapes_data, tmp_path):
    """fp16's GradScaler multiplies the loss by 2^16 before backward; the gradient is divided back
    before it is clipped and logged, so the fp16 run's first-step norm is the fp32 run's (to fp16
    rounding), not 65536 times it."""
    norms = {}
    for precision in ("fp16", "fp32"):
        cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path / precision, max_steps=1, fp16=precision == "fp16")
        cfg.model.dtype = "float16" if precision == "fp16" else "float32"
        train(cfg, build(cfg), sft, load_split(cfg.data, "train"))
        norms[precision] = json.loads((tmp_path / precision / "log.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.01), norms  # 4e-4 apart, measured


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
    snapshots, scored = [], []
    real_evaluate = evaluate.evaluate

    def evaluate_and_snapshot(*args):
        snapshots.append({n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad})
        scored.append(real_evaluate(*args))
        return scored[-1]

    monkeypatch.setattr(evaluate, "evaluate", evaluate_and_snapshot)
    train(cfg, built, sft, load_split(cfg.data, "train"), eval_ds=load_split(cfg.data, "test"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # Each logged accuracy is that evaluation's answers scored (exact match, case aside), over all 8.
    for record, answers in zip(evals, scored):
        assert len(answers["predictions"]) == 8
        right = sum(p.lower() in {r.lower() for r in refs} for p, refs in zip(answers["predictions"], answers["references"]))
        assert record["accuracy"] == right / 8
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
    cfg.lora.dropout = 0.5  # the validation loss is measured without it, whatever mode training left
    built = build(cfg)
    # Adapters that matter, so that dropout-free eval mode does: the loss measured with dropout
    # on is 1.5e-3 away with B ~ N(0, 2²), but only 1e-6 with B ~ N(0, 0.1²).
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=2.0)
    ds = load_split(cfg.data, "test")

    read = []
    real_collate = sft.collate
    monkeypatch.setattr(sft, "collate", lambda ds, idx, *a: read.extend(idx) or real_collate(ds, idx, *a))
    built.model.train()  # as the loop calls it
    ours = sft.validation_loss(cfg, built, ds)
    assert sorted(read) == list(range(50))
    assert built.model.training  # and training goes on with dropout

    expected, tokens = plain_loss(cfg, built, ds)
    assert tokens > 50 * 2  # answers really are of many lengths
    assert ours == pytest.approx(expected, rel=1e-5)


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
    # Not batch × seq rows: the answer rows, in one chunk (train.logits_chunk's default is larger),
    # which backward runs again instead of keeping its logits.
    assert n_answer < cfg.train.logits_chunk and rows == [n_answer, n_answer]
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
    train(cfg, built, sft, ds)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    windows = epoch_batches(len(ds), 5, cfg.train.seed, 0)[:3]
    batches = [collate(ds, w, cfg.data, paligemma, built.processor) for w in windows]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # image + text, never padding
    assert tokens < sum(b["input_ids"].numel() for b in batches)  # there was padding to leave out
    last = records[-1]
    assert last["tokens_per_s"] / last["samples_per_s"] == pytest.approx(tokens / 15, rel=1e-9)
    assert "mfu" not in last  # only on a GPU with a known peak
    # the step's padding: the share of its batch's positions that no sample filled
    padding = 1 - int(batches[-1]["attention_mask"].sum()) / batches[-1]["attention_mask"].numel()
    assert last["padding"] == pytest.approx(padding, rel=1e-9) and padding > 0


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
