"""QLoRA-fine-tune a VLM from a TOML config.

    python train.py --config configs/paligemma.toml [--set train.max_steps=3 ...] [--resume [DIR]]

With data.eval_split set, the model is scored before and after training, and
<output_dir>/metrics.json records both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minivlm import plain_warnings
from minivlm.build import build
from minivlm.checkpoint import latest_checkpoint, load_adapter, write_atomic
from minivlm.config import ConfigError, load_config
from minivlm.data import collate, load_split, warn_unknown_answers
from minivlm.evaluate import evaluate
from minivlm.loop import train
from minivlm.plan import format_plan, parse_size, plan_memory
from minivlm.plot import plot_run


def show(when: str, scored: dict) -> None:
    print(f"{scored['metric']} {when} training: {scored['score']:.3f} on {scored['n']} held-out samples")
    for q, p, r in list(zip(scored["prompts"], scored["predictions"], scored["references"]))[:4]:
        print(f"  {q!r:28} -> {p!r:22} (reference {' | '.join(r)!r})")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set train.max_steps=3")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                    help="continue from a checkpoint directory (default: the newest save in <output_dir>)")
    ap.add_argument("--dry-run", action="store_true", help="print the expected peak memory (meta device: no weights read) and exit")
    ap.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: does it fit in SIZE, e.g. 24GiB")
    args = ap.parse_args(argv)
    plain_warnings()
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:  # minivlm/plan.py: from config.json alone, no weights, no data
            plan = plan_memory(cfg)
            print(format_plan(plan, parse_size(args.gpu_memory) if args.gpu_memory else None))
            return {"dry_run": True, "total_bytes": plan.total()}
        resume = None
        if args.resume is not None:
            resume = Path(args.resume) if args.resume else latest_checkpoint(cfg.train.output_dir)
            if resume is None or not (resume / "state.json").is_file():
                raise ConfigError(f"--resume: {resume or cfg.train.output_dir} holds no checkpoint (no state.json); "
                                  "give the directory a previous run saved, e.g. runs/demo/last")
        elif latest_checkpoint(cfg.train.output_dir):  # never overwrite saved work by accident
            raise ConfigError(f"{cfg.train.output_dir} already holds a checkpoint; continue it with --resume, "
                              "or set another train.output_dir (or delete that one)")
        built = build(cfg)
        if cfg.train.init_from and resume is None:
            loaded = load_adapter(cfg.train.init_from, built.model, partial=True)
            print(f"train.init_from: {len(loaded)} tensors from {cfg.train.init_from}")
        train_ds = load_split(cfg.data, cfg.data.train_split)
        collate(train_ds, [0], cfg.data, built.family, built.processor)  # data/family mismatches show up now
        warn_unknown_answers(train_ds, cfg.data, built.processor.tokenizer)
        eval_ds = load_split(cfg.data, cfg.data.eval_split) if cfg.data.eval_split else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{len(built.quantized)} linears in 4-bit, {len(built.adapted)} with LoRA; trainable params "
          f"{built.trainable_params:,} of {built.total_params:,} ({100 * built.trainable_params / built.total_params:.2f}%)")

    metrics = {"trainable_params": built.trainable_params, "total_params": built.total_params}
    if eval_ds is not None:
        before = evaluate(cfg, built, eval_ds)
        metrics[f"{cfg.data.metric}_before"] = before["score"]
        show("before", before)
    result = train(cfg, built, train_ds, eval_ds=eval_ds, resume=resume,
                   score_before=metrics.get(f"{cfg.data.metric}_before"))
    metrics.update(train_seconds=result["train_seconds"], final_loss=result["loss"], steps=result["step"])
    if cfg.train.eval_every:
        key = f"best_{cfg.train.best_by}"
        metrics.update({key: result[key], "stopped_early": result["stopped_early"]})
    if eval_ds is not None:
        after = evaluate(cfg, built, eval_ds)
        metrics[f"{cfg.data.metric}_after"] = after["score"]
        show("after", after)
        print(f"training took {result['train_seconds']:.0f}s")
    out = Path(cfg.train.output_dir) / "metrics.json"
    write_atomic(out, json.dumps(metrics, indent=2).encode())
    title = f"{args.config}: {result['step']} steps, final train loss {result['loss']:.3g}"
    if eval_ds is not None:
        title += f", {cfg.data.metric} {metrics[f'{cfg.data.metric}_before']:.3f} -> {after['score']:.3f}"
    print(f"wrote {out} and {plot_run(cfg.train.output_dir, cfg.data.metric, title)}")
    return metrics


if __name__ == "__main__":
    main()
