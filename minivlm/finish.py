"""The end of a run, and completing one whose end a crash cut short.

A run ends with its final save (checkpoint.py), the evaluation after training, metrics.json and
curves.png, each written whole or not at all. A crash between them (SIGKILL, the OOM killer, a
power cut) leaves a run whose training is done but whose end is not: `last` may still point at
the save before, the prune half done, metrics.json or curves.png missing. `--resume` on such a
run trains nothing; `complete()` does what is missing and says what. What it needs that training
produced is kept where a crash cannot lose it: the scores before training in before.json
(measured once per run: `measured_before`), the final loss and time in log.jsonl, the best in the
final save's state.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import ModuleType

from minivlm import distributed
from minivlm.config import Config


def shown(path: Path) -> str:
    """A save's directory as a user finds it: relative to here where it is below, symlinks resolved."""
    real = Path(path).resolve()
    return str(real.relative_to(Path.cwd())) if real.is_relative_to(Path.cwd()) else str(real)


def trained_out(cfg: Config, meta: dict, steps: int) -> bool:
    """Whether a save ends its run's training: at the last step, or stopped early (its loop state
    counts train.early_stopping_patience evaluations without a better one)."""
    patience = cfg.train.early_stopping_patience
    return meta["step"] >= steps or bool(patience and meta["loop"].get("evals_since_best", 0) >= patience)


def trained_figures(cfg: Config, result: dict) -> dict:
    """metrics.json's figures of the training itself, from train()'s result (or from the saved run's
    log and state, in complete())."""
    # JSON has no NaN: a run without one finite loss (every step skipped) stores null, and says so.
    final_loss = result["loss"] if math.isfinite(result["loss"]) else None
    if final_loss is None:
        print("warning: no step of this run had a finite loss; final_loss is null in metrics.json")
    figures = {"train_seconds": result["train_seconds"], "final_loss": final_loss, "steps": result["step"]}
    if cfg.train.eval_every:
        key = f"best_{cfg.train.best_by}"
        figures.update({key: result[key], "stopped_early": result["stopped_early"]})
    return figures


def write_results(cfg: Config, args: argparse.Namespace, metrics: dict, objective: ModuleType,
                  evaluated: bool) -> None:
    """The end of a run: metrics.json, then curves.png (each written whole or not at all)."""
    from minivlm.evaluate import save_metrics
    from minivlm.plot import plot_run

    out = save_metrics(cfg.train.output_dir, metrics)
    loss = metrics["final_loss"] if metrics["final_loss"] is not None else float("nan")
    title = f"{args.config}: {metrics['steps']} steps, final train loss {loss:.3g}"
    plotted = objective.PLOTTED or cfg.data.metric
    if evaluated:
        title += f", {plotted} {metrics[f'{plotted}_before']:.3f} -> {metrics[f'{plotted}_after']:.3f}"
    print(f"wrote {out} and {plot_run(cfg.train.output_dir, plotted, title, objective.CURVE, objective.SHARES)}")


def measured_before(cfg: Config, built, eval_ds, objective: ModuleType, state, fresh: bool,
                    trackers=None) -> dict:
    """The run as it was before training: <output_dir>/before.json, measured once per run (the
    evaluation takes minutes on a real model) and read back by every --resume. A fresh run
    measures anew, whatever an earlier run left there, and sends its answers to `trackers`."""
    from minivlm.checkpoint import write_atomic
    from minivlm.evaluate import report

    path = Path(cfg.train.output_dir) / "before.json"
    if not fresh and path.is_file():
        return json.loads(path.read_text())
    figures, entries = report("before", cfg, built, eval_ds, objective, state, trackers) \
        if eval_ds is not None else ({}, {})
    start = {"trainable_params": built.trainable_params, "total_params": built.total_params,
             "figures": figures, "entries": entries}
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(start).encode())
    return start


def complete(cfg: Config, args: argparse.Namespace, resume: Path, meta: dict, steps: int, eval_ds,
             objective: ModuleType) -> dict:
    """--resume on a run whose training is done (trained_out): finish what the end of a run does,
    where a crash cut it short. recover() points `last` at the final save, clears leftovers and
    prunes; the evaluation after training, metrics.json and curves.png are made if missing. Says
    what it completed; a run that is whole gets "nothing to do", and nothing changes."""
    from minivlm.build import build
    from minivlm.checkpoint import load_adapter, recover
    from minivlm.evaluate import report

    out = Path(cfg.train.output_dir)
    done = recover(out, cfg.train.keep_checkpoints, resumed=resume, best=meta["loop"].get("best_checkpoint")) \
        if distributed.is_main() else []
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    evaluated = eval_ds is not None
    if metrics.get("steps") != meta["step"] or (evaluated and f"{cfg.data.metric}_after" not in metrics):
        built = state = None
        if evaluated or not (out / "before.json").is_file():
            built = build(cfg)
            load_adapter(resume, built.model)
            state = objective.setup(cfg, built)
        start = measured_before(cfg, built, eval_ds, objective, state, fresh=False)
        metrics = {"trainable_params": start["trainable_params"], "total_params": start["total_params"],
                   **start["entries"], **trained_figures(cfg, saved_result(cfg, out, meta, steps))}
        if evaluated:
            metrics.update(report("after", cfg, built, eval_ds, objective, state)[1])
        if distributed.is_main():
            write_results(cfg, args, metrics, objective, evaluated)
        done.append("evaluated after training and wrote metrics.json and curves.png" if evaluated
                    else "wrote metrics.json and curves.png")
    elif not readable_png(out / "curves.png") and distributed.is_main():
        write_results(cfg, args, metrics, objective, evaluated)
        done.append("drew curves.png again")
    if not done:
        print(f"nothing to do: {shown(resume)} is at step {meta['step']}, and this run has {steps} steps; "
              "to train on, raise train.max_steps (or train.epochs) and --resume again")
        return {"steps": meta["step"], "nothing_to_do": True}
    print(f"training was done at step {meta['step']} ({shown(resume)}); completed the end of the run: "
          f"{'; '.join(done)}")
    return metrics


def saved_result(cfg: Config, out: Path, meta: dict, steps: int) -> dict:
    """What train() returns, for a run whose training is done, from its final save's state and its
    log: the last step's loss and time."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(records) if "loss" in r and r["step"] <= meta["step"]), {})
    from minivlm.loop import best_figure
    return {"step": meta["step"], "loss": last.get("loss", math.nan), "train_seconds": last.get("seconds", 0.0),
            f"best_{cfg.train.best_by}": best_figure(meta["loop"], cfg.train.best_by),
            "stopped_early": meta["step"] < steps}


def readable_png(path: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False
