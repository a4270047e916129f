"""The training loop: one readable function from batches to optimizer steps.

One optimizer step = `grad_accum` micro-batches. The loss of the step is

    L = Σ_micro Σ_answer-tokens  -log p(token)   /   N_answer-tokens(all micro-batches)

so every answer token weighs the same however the tokens fall into micro-batches:
batch 4 × accum 1 and batch 1 × accum 4 give the same gradient. (Averaging each micro-batch's
mean loss instead would over-weight the tokens of short answers.)

Under torchrun (see distributed.py) the sums run over every rank's micro-batches too: the answer
tokens are counted across ranks before dividing, and DDP sums the ranks' gradients, so N ranks
× batch b give the same gradient as one process with batch N·b. Each rank evaluates its share of
the eval split and every rank scores the gathered answers, so all decide alike (best, early
stopping); rank 0 alone writes the checkpoints and the log.

With train.objective = "dpo" the micro-batches hold preference pairs, and dpo.backward_window
takes backward_window's place: the same loop, another loss (see dpo.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minivlm import distributed, dpo
from minivlm.build import Built
from minivlm.checkpoint import load_adapter, load_training_state, recover, save_checkpoint, write_atomic
from minivlm.config import Config, to_dict
from minivlm.batches import answer_positions, collate
from minivlm import steps
from minivlm.steps import filler_batch, steps_per_epoch, train_loader
from minivlm.evaluate import evaluate
from minivlm.lora import logical_numel
from minivlm.optim import build_optimizer, lr_at
from minivlm.precision import logits_of


def answer_loss_sum(cfg: Config, built: Built, batch: dict[str, torch.Tensor],
                    model: torch.nn.Module | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (labels != -100), in fp32.

    Position t predicts token t+1, so the positions that carry loss are those whose *next* label
    is set. Only they go through the lm_head: a PaliGemma sample is 256 image tokens, a prompt
    and a few answer tokens, and full logits would be a (batch, seq, 257152) tensor, kept for
    backward, of which all but the answer rows are thrown away. Here logits are (n answer
    tokens, vocab), and only they are upcast to fp32. `model`: see precision.logits_of.
    """
    targets = batch["labels"][:, 1:].to(built.device)
    logits = logits_of(cfg, built, batch, at=answer_positions(batch), model=model).float()
    return F.cross_entropy(logits, targets[targets != -100], reduction="sum")


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labelled positions that some earlier position predicts."""
    return int(answer_positions(batch).sum())


def backward_window(cfg: Config, built: Built, model: torch.nn.Module, batches: list[dict],
                    scaler: torch.amp.GradScaler, filler: dict | None = None) -> tuple[float, int]:
    """Forward + backward over one accumulation window; returns (loss per answer token, answer tokens).

    Each micro-batch's summed loss is divided by the answer tokens of the *whole* window, so
    the accumulated .grad is the gradient of the per-token mean over the window. A window
    without answer tokens does nothing and returns (nan, 0). `model` is built.model, or under
    torchrun its DDP wrapper (distributed.wrap); then the window is the global step's: its
    tokens counted on every rank, its loss summed over them, and its gradients summed by DDP in
    the backward of the last micro-batch. `filler`: see steps.filler_batch (DDP only).
    """
    n_tokens = int(distributed.total(sum(answer_tokens(b) for b in batches), built.device))
    if n_tokens == 0:
        return float("nan"), 0
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
    return distributed.total(local, built.device), n_tokens


@torch.no_grad()
def validation_loss(cfg: Config, built: Built, ds: datasets.Dataset) -> float:
    """Loss per answer token over the eval split (its first data.eval_samples rows if set); under
    torchrun each rank sums over its share of the rows, and the sums are added up."""
    rows = distributed.shard(min(cfg.data.eval_samples or len(ds), len(ds)), built.model)
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
    built.model.train()
    total, tokens = distributed.totals([total, tokens], built.device)
    return total / max(tokens, 1)


def validation(cfg: Config, built: Built, ds: datasets.Dataset,
               reference: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The eval split's loss, "val_loss": per answer token, or with train.objective = "dpo" the DPO
    loss per pair, with the held-out rewards and preference accuracy (dpo.held_out; `reference`:
    dpo.reference_weights)."""
    if cfg.train.objective == "dpo":
        scores = dpo.held_out(cfg, built, ds, reference)
        return {"val_loss": scores.pop("dpo_loss"), **scores}
    return {"val_loss": validation_loss(cfg, built, ds)}


# Dense bf16 tensor-core peaks (FLOP/s) of the SXM data-centre parts, for MFU (a PCIe H100 peaks
# lower, so its MFU reads low); other GPUs log none.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_per_s(device: torch.device, cfg: Config) -> float:
    """The GPU's bf16/fp16 peak, if known and training runs in half precision; else 0 (no MFU)."""
    if device.type != "cuda" or not (cfg.train.bf16 or cfg.train.fp16):
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), 0.0)


def train_flops_per_token(built: Built, checkpointing: bool, reference: bool = False) -> float:
    """Matmul FLOPs of one training step per token, the estimate MFU is measured against.

    Each weight costs 2 FLOPs per token forward (a multiply and an add) and 2 more backward for
    the gradient of its input, which earlier adapters need; a frozen weight needs no gradient of
    its own (the 2 more that full fine-tuning's 6N counts). Checkpointing runs the forward twice.
    Attention scores and the adapters are left out (small at these sequence lengths and ranks),
    and so are embeddings, which are a lookup: a slight underestimate, as nanoGPT's 6N is. DPO's
    `reference` model runs one more forward.
    """
    params = sum(logical_numel(p) for n, p in built.model.named_parameters() if "embed" not in n)
    return (4 + 2 * checkpointing + 2 * reference) * params


class StopSignal:
    """SIGTERM and SIGINT while training: remembered, and acted on once the current step is done.

    A preemptible VM or a job scheduler sends SIGTERM (and kills a while later); Ctrl-C sends
    SIGINT. Dying at once would lose every step since the last save, so the handler only sets
    `signum`; the loop finishes its step, saves and returns. A second signal stops at once
    (KeyboardInterrupt), for when even a save is too long to wait for; but not one that comes
    within a second of the first: under torchrun, Ctrl-C reaches every process of the terminal's
    group, and torchrun then forwards it to its workers, which see it twice.

    A context manager: the handlers are installed for the duration of training only and the
    previous ones put back after, so tests and programs that call train() keep their own.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    ECHO_SECONDS = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0  # when signum came
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first < self.ECHO_SECONDS:
                return  # the launcher's echo of the first
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving "
              "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignal:
        # Python lets only the main thread install handlers; from another thread, train as before.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient: training cannot go on."""


def open_log(path: Path, keep_until: int):
    """The JSONL step log, holding only the steps up to `keep_until` (those a resume continues from).

    The kept lines are written to a new file renamed over the old one, so a crash right here
    cannot empty the log; a last line cut short by a crash is dropped."""
    kept = []
    if keep_until and path.exists():
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= keep_until:
                    kept.append(line)
            except ValueError:
                pass
    write_atomic(path, "".join(kept).encode())
    return path.open("a")


def train(cfg: Config, built: Built, train_ds: datasets.Dataset, eval_ds: datasets.Dataset | None = None,
          resume: str | Path | None = None, score_before: float | None = None) -> dict:
    """Train the adapters of `built.model` on `train_ds`; write checkpoints and a JSONL log to output_dir.

    Checkpoints go to <output_dir>/checkpoints (see checkpoint.py): every train.save_every steps,
    at the end, and at each new best; `last` points at the newest, `best` at the best.
    With train.eval_every, the loss and data.metric on `eval_ds` are measured every that many
    steps; the best is chosen by train.best_by, and train.early_stopping_patience evaluations
    without one end the run. A fresh run then logs step 0 too: `score_before` (data.metric
    before training, which train.py has measured) and the validation loss, so curves start
    where training did.
    A step whose loss or gradient norm is NaN/inf is skipped (logged, no update); after
    train.max_nonfinite_steps of them in a row, NonFiniteLoss is raised and nothing more is saved.
    SIGTERM or SIGINT (see StopSignal) ends the run after the current step, saved like the end.
    Returns {"step", "loss", "train_seconds", "best_<best_by>", "stopped_early", "signal"}
    (signal: the number of the signal that stopped the run, else None).
    """
    t, model, device = cfg.train, built.model, built.device
    world, main = distributed.world_size(), distributed.is_main()
    out = Path(t.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    per_epoch = steps_per_epoch(len(train_ds), t.batch_size * world, t.grad_accum)
    total_steps = steps.total_steps(t, len(train_ds), world)
    optimizer = build_optimizer(model, t)
    # Loss scaling only matters for fp16, whose 5 exponent bits underflow small gradients;
    # bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=t.fp16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    preferences = t.objective == "dpo"  # pairs, and DPO's loss against a reference (minivlm/dpo.py)
    reference = dpo.reference_weights(cfg, model) if preferences else None

    start, loop_state = 0, {"best_score": -float("inf"), "evals_since_best": 0}
    if resume:
        load_adapter(resume, model)
        start, saved = load_training_state(resume, optimizer, scaler)  # RNG too: same dropout masks
        loop_state.update(saved)
    if main:
        # What a crash left half done (see checkpoint.py); `best` is the resumed save's idea of it.
        recover(out, t.keep_checkpoints, resumed=Path(resume) if resume else None,
                best=loop_state.get("best_checkpoint"))
    # The other ranks log into the void: the same lines as rank 0's, which are written.
    log = open_log(out / "log.jsonl", keep_until=start) if main else open(os.devnull, "w")
    if start == 0 and t.eval_every and eval_ds is not None and score_before is not None:
        log.write(json.dumps({"step": 0, **validation(cfg, built, eval_ds, reference),
                              cfg.data.metric: score_before}) + "\n")
    # Under torchrun the training forward goes through DDP (or FSDP); checkpoints and generation use
    # `model`. Wrapped after step 0's evaluation: FSDP's first forward must be its wrapper's.
    trained = distributed.wrap(model, device, shard=t.fsdp)
    filler = filler_batch(train_ds, cfg.data, built.family, built.processor) if world > 1 else None
    saved_step = start if resume else -1

    def save(step: int, best: bool = False) -> None:
        # One directory per step, however many reasons there are to save it (best, save_every, the end).
        nonlocal saved_step
        if step != saved_step or best:
            if main:
                save_checkpoint(out, model, optimizer, scaler, step, to_dict(cfg), loop_state, best=best,
                                keep=t.keep_checkpoints, world_size=world)
            saved_step = step

    model.train()
    # In a log file (CI, nohup) every refresh is a new line: refresh every 30 s there instead.
    # Updated by hand, not iterated: an iterated bar only learns its count when it redraws.
    tty = sys.stderr.isatty()
    bar = tqdm(initial=start, total=total_steps, desc="train", dynamic_ncols=True, disable=not main,
               mininterval=0.1 if tty else 30, maxinterval=10 if tty else 60)
    loss_value, t0, samples, tokens = float("nan"), time.perf_counter(), 0, 0
    step, last_eval, nonfinite = start - 1, {}, 0
    peak_flops = peak_flops_per_s(device, cfg)
    flops_per_token = train_flops_per_token(built, t.gradient_checkpointing, reference=preferences)
    loader = train_loader(train_ds, cfg.data, cfg.model.family, built.processor, t.batch_size, t.grad_accum,
                         t.seed, start, total_steps, world, distributed.rank(),
                         collate_fn=dpo.collate_pairs if preferences else None)
    with StopSignal() as stop:  # until the last save is written: a signal never cuts one short
        for step, window, batches in loader:
            bar.update()
            epoch = step // per_epoch
            if preferences:  # n counts pairs; rewards: their mean rewards and reward accuracy
                window_loss, n, rewards = dpo.backward_window(cfg, built, trained, batches, scaler, reference, filler)
            else:  # n counts answer tokens
                (window_loss, n), rewards = backward_window(cfg, built, trained, batches, scaler, filler), {}
            distributed.sum_gradients(trained, trainable)  # FSDP only: DDP summed them in the backward
            if n == 0:
                warnings.warn(f"step {step}: no {'usable pairs' if preferences else 'answer tokens'} in these "
                              f"{len(window)} micro-batches; skipping the step instead of dividing by zero")
                continue

            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
            lr = lr_at(step, total_steps, t)
            # One NaN/inf step would make every adapter weight NaN for good: skip it instead. With
            # fp16, GradScaler already skips steps whose gradients overflowed (and lowers its scale;
            # that is routine, not counted); a non-finite loss counts in every precision.
            if not math.isfinite(window_loss) or (not t.fp16 and not math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # fp16: lower the scale as an overflow would; no-op otherwise
                nonfinite += 1
                what = "loss" if not math.isfinite(window_loss) else "gradient norm"
                log.write(json.dumps({"step": step + 1, "epoch": epoch, "skipped": f"non-finite {what}",
                                      "lr": lr}) + "\n")
                log.flush()
                bar.write(f"step {step + 1}: {what} is {window_loss if what == 'loss' else float(grad_norm)}; "
                          f"step skipped ({nonfinite} in a row, stopping at {t.max_nonfinite_steps})")
                if nonfinite >= t.max_nonfinite_steps:
                    bar.close()
                    log.close()
                    last = f"the last save, {out / 'last'}" if saved_step >= 0 else "no save (none was made)"
                    raise NonFiniteLoss(
                        f"step {step + 1}: the {what} was NaN or inf for {nonfinite} steps in a row, training "
                        f"stopped; likely causes: train.lr = {t.lr:g} too high, fp16 overflow (try bf16), or bad "
                        f"data; nothing was saved over {last}")
                continue
            nonfinite = 0
            loss_value = window_loss
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            samples += sum(len(idx) for idx in window)
            # Image tokens count, padding not; every rank's.
            tokens += int(distributed.total(sum(int(b["attention_mask"].sum()) for b in batches), device))
            seconds = time.perf_counter() - t0
            speed = {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}
            if peak_flops:  # model FLOPs utilisation: the share of the GPU's peak the step's math used
                speed["mfu"] = speed["tokens_per_s"] * flops_per_token / peak_flops
            # DPO: the reward margin and reward accuracy of this step's pairs
            shown = ({"margin": f"{rewards['reward_margin']:.3f}", "r_acc": f"{rewards['reward_accuracy']:.2f}"}
                     if preferences else {})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed['tokens_per_s']:.0f}",
                            **shown, **last_eval, refresh=False)
            log.write(json.dumps({"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": lr,
                                  "grad_norm": float(grad_norm), "pairs" if preferences else "answer_tokens": n,
                                  **rewards, **speed}) + "\n")
            log.flush()
            if t.eval_every and eval_ds is not None and (step + 1) % t.eval_every == 0:
                # Generation puts the model in eval mode without grad: the moment bitsandbytes would
                # repack 4-bit weights on some CPUs, which quant.py turns off so training can go on.
                record = {"step": step + 1, **validation(cfg, built, eval_ds, reference),
                          cfg.data.metric: evaluate(cfg, built, eval_ds)["score"]}
                log.write(json.dumps(record) + "\n")
                last_eval = {k: f"{v:.4f}" for k, v in record.items() if k in ("val_loss", cfg.data.metric,
                                                                             "preference_accuracy")}
                bar.write(f"step {step + 1}: validation loss {record['val_loss']:.4f}, "
                          f"{cfg.data.metric} {record[cfg.data.metric]:.4f}" + (
                              f", preference accuracy {record['preference_accuracy']:.4f}" if preferences else ""))
                # Higher is better for every metric; lower for the loss.
                score = record[cfg.data.metric] if t.best_by == "metric" else -record["val_loss"]
                if score > loop_state["best_score"]:
                    loop_state.update(best_score=score, evals_since_best=0)
                    save(step + 1, best=True)
                else:
                    loop_state["evals_since_best"] += 1
                if t.early_stopping_patience and loop_state["evals_since_best"] >= t.early_stopping_patience:
                    bar.write(f"early stop: no better {t.best_by} in {t.early_stopping_patience} evaluations "
                              f"(best kept in {out / 'best'})")
                    break
            if t.save_every and (step + 1) % t.save_every == 0:
                save(step + 1)
            # The step is done: save it (below) and return. Any rank's signal stops them all, since
            # a rank that went on alone would wait forever for the others' gradients.
            if distributed.total(float(stop.signum is not None), device):
                break
        bar.close()
        log.close()
        stopped_early = step + 1 < total_steps
        save(step + 1)
        distributed.barrier()  # no rank returns (and its launcher reports the run done) before the save exists
    best = loop_state["best_score"] if t.best_by == "metric" else -loop_state["best_score"]
    return {"step": step + 1, "loss": loss_value, "train_seconds": time.perf_counter() - t0,
            f"best_{t.best_by}": best, "stopped_early": stopped_early, "signal": stop.signum}
