"""The training loop: one readable function from batches to optimizer steps.

What a step computes is the objective's (minivlm/objectives/: SFT, DPO, GRPO): it collates the
micro-batches, runs forward and backward over one accumulation window, and says what it
measured. Everything else is the same for every objective and is here: clipping, the
learning-rate schedule, skipping NaN/inf steps, the 8-bit AdamW step, the log, evaluation,
keeping the best, early stopping, saving, and stopping cleanly on a signal.

Under torchrun (see distributed.py) the objective's sums run over every rank's micro-batches,
DDP sums the gradients, each rank evaluates its share of the eval split and every rank scores
the gathered answers, so all decide alike (best, early stopping); rank 0 alone writes the
checkpoints and the log.
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
from types import ModuleType

import datasets
import torch
from tqdm import tqdm

from minivlm import distributed, evaluate, steps
from minivlm.build import Built
from minivlm.checkpoint import load_adapter, load_training_state, recover, save_checkpoint, write_atomic
from minivlm.config import Config, to_dict
from minivlm.data import record_skipped
from minivlm.lora import logical_numel
from minivlm.optim import build_optimizer, lr_at
from minivlm.trackers import Trackers


# Dense bf16 tensor-core peaks (FLOP/s) of the SXM data-centre parts, for MFU (a PCIe H100 peaks
# lower, so its MFU reads low); other GPUs log none.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_per_s(device: torch.device, cfg: Config) -> float:
    """The GPU's bf16/fp16 peak, if known and training runs in half precision; else 0 (no MFU)."""
    if device.type != "cuda" or not (cfg.train.bf16 or cfg.train.fp16):
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), 0.0)


def train_flops_per_token(built: Built, checkpointing: bool, extra_forwards: int = 0) -> float:
    """Matmul FLOPs of one training step per token, the estimate MFU is measured against.

    Each weight costs 2 FLOPs per token forward (a multiply and an add) and 2 more backward for
    the gradient of its input, which earlier adapters need; a frozen weight needs no gradient of
    its own (the 2 more that full fine-tuning's 6N counts). Checkpointing runs the forward twice.
    Attention scores and the adapters are left out (small at these sequence lengths and ranks),
    and so are embeddings, which are a lookup: a slight underestimate, as nanoGPT's 6N is. An
    objective's `extra_forwards` (DPO's reference) cost 2 each.
    """
    params = sum(logical_numel(p) for n, p in built.model.named_parameters() if "embed" not in n)
    return (4 + 2 * checkpointing + 2 * extra_forwards) * params


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


class Run:
    """What training changes as it goes: the optimizer and its GradScaler, the step, the last loss,
    the loop's `state` saved with every checkpoint (the best so far, the evaluations since it and,
    reading a stream, where the next step starts), the step log and the saves. The objective's
    state (its setup's) is saved and restored too where it has a state_dict (GRPO's sampled batch).
    What the log gets, train.report_to's trackers get too."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, resume: str | Path | None,
                 objective_state=None, trackers: Trackers | None = None):
        t, self.cfg, self.model = cfg.train, cfg, model
        self.trackers = trackers or Trackers()
        self.carried = objective_state if hasattr(objective_state, "state_dict") else None
        self.out, self.main = Path(t.output_dir), distributed.is_main()
        self.optimizer = build_optimizer(model, t)
        # Loss scaling only matters for fp16, whose 5 exponent bits underflow small gradients;
        # bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.fp16)
        self.state = {"best_score": -float("inf"), "evals_since_best": 0}
        self.start = 0
        if resume:
            load_adapter(resume, model)
            self.start, saved, carried = load_training_state(resume, self.optimizer, self.scaler)  # RNG too
            self.state.update(saved)
            if self.carried is not None:
                self.carried.load_state_dict(carried)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            # What a crash left half done (see checkpoint.py); `best` is the resumed save's idea of it.
            done = recover(self.out, t.keep_checkpoints, resumed=Path(resume) if resume else None,
                           best=self.state.get("best_checkpoint"))
            if done:
                print(f"recovered {self.out}: {'; '.join(done)}")
        # The other ranks log into the void: the same lines as rank 0's, which are written.
        self.log = open_log(self.out / "log.jsonl", keep_until=self.start) if self.main else open(os.devnull, "w")
        self.step, self.loss, self.nonfinite = self.start, float("nan"), 0
        self.saved_step = self.start if resume else -1
        self.shown: dict[str, str] = {}  # the last evaluation's figures, on the progress bar

    def write(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        self.trackers.log(record)

    def save(self, step: int, best: bool = False) -> None:
        """One directory per step, however many reasons there are to save it (best, save_every, the end)."""
        if step != self.saved_step or best:
            if self.main:
                save_checkpoint(self.out, self.model, self.optimizer, self.scaler, step, to_dict(self.cfg), self.state,
                                best=best, keep=self.cfg.train.keep_checkpoints, world_size=distributed.world_size(),
                                objective_state=self.carried.state_dict() if self.carried is not None else None)
            self.saved_step = step

    def skipped(self, loss: float, grad_norm: float, lr: float, epoch: int, bar: tqdm) -> bool:
        """Whether this step must be skipped: one NaN/inf step would make every adapter weight NaN
        for good. With fp16, GradScaler already skips steps whose gradients overflowed (and lowers
        its scale; routine, not counted); a non-finite loss counts in every precision. After
        train.max_nonfinite_steps in a row, NonFiniteLoss, with nothing saved over the last save."""
        t = self.cfg.train
        if math.isfinite(loss) and (t.fp16 or math.isfinite(grad_norm)):
            self.nonfinite = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # fp16: lower the scale as an overflow would; no-op otherwise
        self.nonfinite += 1
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        self.write({"step": self.step, "epoch": epoch, "skipped": f"non-finite {what}", "lr": lr})
        bar.write(f"step {self.step}: {what} is {loss if what == 'loss' else grad_norm}; step skipped "
                  f"({self.nonfinite} in a row, stopping at {t.max_nonfinite_steps})")
        if self.nonfinite >= t.max_nonfinite_steps:
            bar.close()
            self.log.close()
            last = f"the last save, {self.out / 'last'}" if self.saved_step >= 0 else "no save (none was made)"
            raise NonFiniteLoss(
                f"step {self.step}: the {what} was NaN or inf for {self.nonfinite} steps in a row, training stopped; "
                f"likely causes: train.lr = {t.lr:g} too high, fp16 overflow (try bf16), or bad data; nothing was "
                f"saved over {last}")
        return True

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            # LoRA+: B's group runs at lora_plus_ratio × lr (an optimizer saved before LoRA+ has no scale)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.scaler.step(self.optimizer)  # skipped by the scaler if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class Meter:
    """Throughput since the run (re)started: samples and tokens per second (image tokens count,
    padding not; every rank's), the share of the step's positions that were padding (none with
    data.packing; where the batches say), and the model FLOPs utilisation on a GPU whose peak is known."""

    def __init__(self, cfg: Config, built: Built, objective: ModuleType):
        self.device, self.samples, self.tokens = built.device, 0, 0
        self.packed = cfg.data.packing
        self.peak = peak_flops_per_s(built.device, cfg)
        self.flops_per_token = train_flops_per_token(built, cfg.train.gradient_checkpointing, objective.EXTRA_FORWARDS)
        self.t0 = time.perf_counter()

    def update(self, window: list[list[int]], batches: list[dict], tokens: int | None = None) -> dict[str, float]:
        """`tokens`: what the step's forwards ran over, every rank's, where its batches do not say
        (GRPO's batches are prompts; its forwards run over the sampled completions too)."""
        self.samples += sum(len(idx) for idx in window)
        padding = {}
        if tokens is None:
            real, positions = distributed.totals([sum(int(b["attention_mask"].sum()) for b in batches),
                                                  sum(b["attention_mask"].numel() for b in batches)], self.device)
            tokens, padding = int(real), {"padding": 0.0 if self.packed else 1 - real / max(positions, 1)}
        self.tokens += tokens
        seconds = time.perf_counter() - self.t0
        speed = {"seconds": seconds, "samples_per_s": self.samples / seconds, "tokens_per_s": self.tokens / seconds,
                 **padding}
        if self.peak:  # the share of the GPU's peak the step's math used
            speed["mfu"] = speed["tokens_per_s"] * self.flops_per_token / self.peak
        return speed


def progress_bar(start: int, total: int) -> tqdm:
    """In a log file (CI, nohup) every refresh is a new line: refresh every 30 s there instead.
    Updated by hand, not iterated: an iterated bar only learns its count when it redraws."""
    tty = sys.stderr.isatty()
    return tqdm(initial=start, total=total, desc="train", dynamic_ncols=True, disable=not distributed.is_main(),
                mininterval=0.1 if tty else 30, maxinterval=10 if tty else 60)


NAMES = {"val_loss": "validation loss", "val_reward": "held-out reward"}  # as the step lines print them


def evaluate_and_keep_best(cfg: Config, built: Built, objective: ModuleType, state, ds: datasets.Dataset, run: Run,
                           bar: tqdm) -> bool:
    """Score the eval split (evaluate.scores) and log it, its first answers to the trackers; save a new
    best (train.best_by); return whether train.early_stopping_patience evaluations have gone by
    without one."""
    t = cfg.train
    # Generation puts the model in eval mode without grad: the moment bitsandbytes would repack
    # 4-bit weights on some CPUs, which quant.py turns off so training can go on.
    answers = evaluate.evaluate(cfg, built, ds)
    record = {"step": run.step, **evaluate.scores(cfg, built, ds, objective, state, answers)}
    run.write(record)
    run.trackers.samples(run.step, answers)
    shown = [objective.CURVE[1], cfg.data.metric, *([objective.PLOTTED] if objective.PLOTTED else [])]
    run.shown = {k: f"{v:.4f}" for k, v in record.items() if k in shown}
    bar.write(f"step {run.step}: " + ", ".join(f"{NAMES.get(k, k.replace('_', ' '))} {record[k]:.4f}" for k in shown))
    # Higher is better for every metric; lower for the loss.
    score = record[cfg.data.metric] if t.best_by == "metric" else -record["val_loss"]
    if score > run.state["best_score"]:
        run.state.update(best_score=score, evals_since_best=0)
        run.save(run.step, best=True)
    else:
        run.state["evals_since_best"] += 1
    if t.early_stopping_patience and run.state["evals_since_best"] >= t.early_stopping_patience:
        bar.write(f"early stop: no better {t.best_by} in {t.early_stopping_patience} evaluations "
                  f"(best kept in {run.out / 'best'})")
        return True
    return False


def best_figure(state: dict, best_by: str) -> float:
    """The best evaluation, as reported, from the loop's state (`Run.state`, saved with every
    checkpoint): its score is kept higher-is-better, so the validation loss is stored negated."""
    return state.get("best_score", -math.inf) * (1 if best_by == "metric" else -1)


def train(cfg: Config, built: Built, objective: ModuleType, train_ds: datasets.Dataset | datasets.IterableDataset,
          eval_ds: datasets.Dataset | None = None, resume: str | Path | None = None, before: dict | None = None,
          state=None, trackers: Trackers | None = None) -> dict:
    """Train the adapters of `built.model` on `train_ds` with `objective` (a minivlm/objectives module;
    `state`: its setup's, made here if not given); write checkpoints and a JSONL log to output_dir.

    Checkpoints go to <output_dir>/checkpoints (see checkpoint.py) every train.save_every steps, at
    the end and at each new best; `last` points at the newest, `best` at the best. With
    train.eval_every, the eval split is scored every that many steps (evaluate_and_keep_best); a
    fresh run logs `before` (the scores before training, which train.py has measured) as step 0,
    so curves start where training did. What the log gets goes to `trackers` too (train.report_to's,
    opened by train.py). NaN/inf steps are skipped (Run.skipped). SIGTERM or SIGINT
    (StopSignal) ends the run after the current step, saved like the end. Returns {"step",
    "loss", "train_seconds", "best_<best_by>", "stopped_early", "signal"}.
    """
    t, model, device = cfg.train, built.model, built.device
    world = distributed.world_size()
    state = objective.setup(cfg, built) if state is None else state
    total = steps.total_steps(t, train_ds, world, objective.iterations(cfg))
    run = Run(cfg, model, device, resume, state, trackers)
    if run.start == 0 and t.eval_every and eval_ds is not None and before is not None:
        run.write({"step": 0, **before})
    # Under torchrun the training forward goes through DDP (or FSDP); checkpoints and generation use
    # `model`. Wrapped after step 0's evaluation: FSDP's first forward must be its wrapper's.
    trained = distributed.wrap(model, device, shard=t.fsdp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    filler = steps.filler_batch(train_ds, cfg.data, built.family, built.processor) if world > 1 else None
    loader = steps.train_loader(train_ds, cfg.data, cfg.model.family, built.processor, t.batch_size, t.grad_accum,
                                t.seed, run.start, total, world, distributed.rank(), collate_fn=objective.collate,
                                resume_at=run.state.get("stream"), repeat=objective.iterations(cfg))
    model.train()
    bar, meter = progress_bar(run.start, total), Meter(cfg, built, objective)
    with StopSignal() as stop:  # until the last save is written: a signal never cuts one short
        for step, epoch, window, batches, skipped, resume_at in loader:
            record_skipped(skipped)  # a worker's, counted here for the end-of-run summary
            run.step = step + 1
            if resume_at is not None:  # a stream's: where a run resumed from this step's save reads on
                run.state["stream"] = resume_at
            bar.update()
            loss, n, logged = objective.backward_window(cfg, built, trained, batches, run.scaler, state, filler)
            distributed.sum_gradients(trained, trainable)  # FSDP only: DDP summed them in the backward
            if n == 0:
                warnings.warn(f"step {step}: no {objective.COUNT.replace('_', ' ')} in these {len(window)} "
                              "micro-batches; skipping the step instead of dividing by zero")
                continue
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf")))
            lr = lr_at(step, total, t)
            if run.skipped(loss, grad_norm, lr, epoch, bar):
                continue
            run.optimizer_step(lr)
            run.loss = loss
            speed = meter.update(window, batches, logged.pop("tokens", None))
            run.write({"step": run.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       objective.COUNT: n, **logged, **speed})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed['tokens_per_s']:.0f}",
                            **objective.shown(logged), **run.shown, refresh=False)
            if (t.eval_every and eval_ds is not None and run.step % t.eval_every == 0
                    and evaluate_and_keep_best(cfg, built, objective, state, eval_ds, run, bar)):
                break
            if t.save_every and run.step % t.save_every == 0:
                run.save(run.step)
            # Any rank's signal stops them all: a rank that went on alone would wait forever for the others.
            if distributed.total(float(stop.signum is not None), device):
                break
        bar.close()
        run.log.close()
        run.save(run.step)
        distributed.barrier()  # no rank returns (and its launcher reports the run done) before the save exists
    return {"step": run.step, "loss": run.loss, "train_seconds": time.perf_counter() - meter.t0,
            f"best_{t.best_by}": best_figure(run.state, t.best_by), "stopped_early": run.step < total, "signal": stop.signum}
