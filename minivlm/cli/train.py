"""QLoRA-fine-tune a VLM from a TOML config.

    python train.py --config configs/paligemma.toml [--set train.max_steps=3 ...] [--resume [DIR]]

With data.eval_split set, the model is scored before and after training, and
<output_dir>/metrics.json records both. SIGTERM or Ctrl-C saves the step in progress and exits
(143 or 130); --resume continues from there, and on a run whose training is done completes what
a crash left of its end (minivlm/finish.py). Every mistake found before training (config, paths,
data, a resume that would not continue the same run) is one `error:` line, before the model loads.

Data-parallel on N devices (minivlm/distributed.py): one process per device, started by torchrun,

    torchrun --standalone --nproc_per_node N train.py --config X

with train.batch_size per rank (the global batch is N × batch_size); train.fsdp = true shards the
base's layers instead of replicating them. Rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn

# Only the standard library and minivlm's config (itself standard library only) are imported
# here: torch, transformers, datasets and bitsandbytes take seconds to import, and `--help` or
# a mistake in the config should answer at once. main() imports them once the config is valid.
from minivlm import plain_warnings
from minivlm.config import Config, ConfigError, load_config, resume_conflicts, to_dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set train.max_steps=3")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                    help="continue from a checkpoint directory (default: the newest save in <output_dir>)")
    ap.add_argument("--dry-run", action="store_true", help="print the expected peak memory (meta device: no weights read) and exit")
    ap.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: does it fit in SIZE, e.g. 24GiB")
    ap.add_argument("--ranks", type=int, default=1, metavar="N",
                    help="with --dry-run: per GPU of N under torchrun (with train.fsdp, the layers sharded N ways)")
    return ap.parse_args(argv)


def check_output_dir(output_dir: str) -> None:
    """train.output_dir is, or can be made, a writable directory: known before anything is loaded."""
    out = Path(output_dir).absolute()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise ConfigError(f"train.output_dir = {output_dir!r} {where}; set train.output_dir to a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir = {output_dir!r}: {existing} is not writable; set train.output_dir "
                          "to a directory you can write to")


def find_resume(cfg: Config, resume_arg: str | None, world_size: int = 1) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue and its state.json, or (None, None) for a fresh run.

    Refuses a fresh run over saved work, a resume whose config changes the math of training
    (config.FREE_ON_RESUME lists what may change), and one with another number of ranks.
    """
    from minivlm.checkpoint import latest_checkpoint, read_state

    if resume_arg is None:
        if latest_checkpoint(cfg.train.output_dir):  # never overwrite saved work by accident
            raise ConfigError(f"{cfg.train.output_dir} already holds a checkpoint; continue it with --resume, "
                              "or set another train.output_dir (or delete that one)")
        return None, None
    resume = Path(resume_arg) if resume_arg else latest_checkpoint(cfg.train.output_dir)
    meta = read_state(resume) if resume is not None else None
    if meta is None:
        raise ConfigError(f"--resume: {resume or cfg.train.output_dir} holds no checkpoint; give the directory "
                          "a previous run saved, e.g. runs/demo/last")
    conflicts = resume_conflicts(meta["config"], to_dict(cfg))
    if conflicts:
        raise ConfigError(f"--resume: {resume} was trained with another config, and these changes would make "
                          f"it another run: {'; '.join(conflicts)}. Put them back, or train anew in another "
                          "train.output_dir")
    # The ranks split every step's samples (steps.TrainSteps): with another number of them, the
    # steps to come would hold other samples than the saved run's. Refused rather than re-split.
    saved_world = meta.get("world_size", 1)
    if saved_world != world_size:
        raise ConfigError(f"--resume: {resume} was trained by {saved_world} process(es) and this run has "
                          f"{world_size}; resume it with the same number (torchrun --nproc_per_node "
                          f"{saved_world}, or plain python for 1)")
    return resume, meta


def check_lengths(ds, cfg: Config, family, processor, rows: int = 16) -> None:
    """Refuse a data.max_length that would drop every sample (training 0 steps), from the first rows.

    Also the first batch the family builds from this data: a data/family mismatch shows up now.
    """
    from minivlm.batches import collate
    from minivlm.data import first_rows

    unlimited = dataclasses.replace(cfg.data, max_length=sys.maxsize)
    lengths = collate(*first_rows(ds, rows), unlimited, family, processor)["attention_mask"].sum(1)
    if bool((lengths > cfg.data.max_length).all()):
        raise ConfigError(f"data.max_length = {cfg.data.max_length} is shorter than every sample: the first "
                          f"{len(lengths)} rows are {int(lengths.min())} to {int(lengths.max())} tokens long "
                          f"(image tokens included); set data.max_length >= {int(lengths.max())}")


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run, as the user started it (train.py, or the installed command)."""
    sets = [part for s in args.set for part in ("--set", s)]
    started = ["minivlm-train"] if Path(sys.argv[0]).name == "minivlm-train" else ["python", "train.py"]
    return shlex.join([*started, "--config", args.config, *sets, "--resume"])


def fail(message: str) -> NoReturn:
    """Exit with one `error:` line. Under torchrun every rank meets the same mistake: rank 0 alone
    says it, the others exit 1 in silence (torchrun sets RANK before any process group exists)."""
    sys.exit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plain_warnings()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        fail(str(e))
    try:
        return run(cfg, args)
    except KeyboardInterrupt:  # Ctrl-C before training, or twice during it: nothing more to save
        print(f"interrupted: nothing saved since the last checkpoint (if any); continue it with: "
              f"{resume_command(args)}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def run(cfg: Config, args: argparse.Namespace) -> dict:
    """Check all that can be checked cheaply, then build, train, evaluate; returns the metrics."""
    import torch

    from minivlm import distributed
    from minivlm.build import build, load_processor, pick_device
    from minivlm.checkpoint import load_adapter
    from minivlm.data import load_scored, load_split, warn_unknown_answers
    from minivlm.finish import complete, shown, trained_out
    from minivlm.models import get_family
    from minivlm.objectives import get_objective
    from minivlm.steps import total_steps
    from minivlm.trackers import check_installed, start as start_trackers

    objective = get_objective(cfg.train.objective)  # minivlm/objectives/: what a step optimizes

    try:
        if args.dry_run:  # minivlm/plan.py: from config.json alone, no weights, no data
            from minivlm.plan import format_plan, parse_size, plan_memory
            plan = plan_memory(cfg, ranks=args.ranks, **objective.planned(cfg))
            print(format_plan(plan, parse_size(args.gpu_memory) if args.gpu_memory else None))
            return {"dry_run": True, "total_bytes": plan.total()}
        # Everything that can go wrong before the model is read (minutes, for a big one).
        check_output_dir(cfg.train.output_dir)
        check_installed(cfg.train.report_to)
        if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device = {cfg.train.device!r} but this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False); set train.device = \"cpu\" or \"auto\"")
        distributed.init(pick_device(cfg.train.device).type)  # under torchrun; nothing alone
        world = distributed.world_size()
        if not distributed.is_main():  # rank 0 speaks for all; the others keep stderr for their errors
            sys.stdout = open(os.devnull, "w")
        resume, meta = find_resume(cfg, args.resume, world)
        train_ds = load_split(cfg.data, cfg.data.train_split, streaming=cfg.data.streaming)
        eval_ds = load_scored(cfg.data, cfg.data.eval_split) if cfg.data.eval_split else None
        steps = total_steps(cfg.train, train_ds, world, objective.iterations(cfg))
        if meta is not None:
            if trained_out(cfg, meta, steps):
                return complete(cfg, args, resume, meta, steps, eval_ds, objective)
            stream = meta["loop"].get("stream")  # where a stream reads on (steps.StreamSteps)
            print(f"resuming from {shown(resume)}: step {meta['step']} of {steps}"
                  + (f", the stream read on from row {stream['row']} of epoch {stream['epoch']}" if stream else ""))
            saved = {k: meta["config"]["train"][k] for k in ("max_steps", "epochs", "batch_size", "grad_accum")}
            planned = total_steps(dataclasses.replace(cfg.train, **saved), train_ds, world, objective.iterations(cfg))
            if planned != steps and cfg.train.schedule != "constant":
                print(f"note: {steps} steps instead of {planned}: the {cfg.train.schedule} learning-rate schedule "
                      f"is recomputed for {steps} steps from step {meta['step']} on (as the transformers "
                      "Trainer does on resume)")
        processor = load_processor(cfg)
        check_lengths(train_ds, cfg, get_family(cfg.model.family), processor)
        warn_unknown_answers(train_ds, cfg.data, processor.tokenizer)

        built = build(cfg, processor)
        if cfg.train.init_from and resume is None:
            loaded = load_adapter(cfg.train.init_from, built.model, partial=True)
            print(f"train.init_from: {len(loaded)} tensors from {cfg.train.init_from}")
        # What the objective needs (DPO: its reference), once for the whole run: a mistake shows now.
        state = objective.setup(cfg, built)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(f"{len(built.quantized)} linears in 4-bit, {len(built.adapted)} with LoRA; trainable params "
          f"{built.trainable_params:,} of {built.total_params:,} ({100 * built.trainable_params / built.total_params:.2f}%)")

    try:  # train.report_to's trackers (rank 0's), closed however the run ends: a resume reopens them
        tracking = start_trackers(cfg, resumed_at=meta["step"] if meta else None, main=distributed.is_main())
    except ConfigError as e:
        fail(str(e))
    with tracking as tracked:
        metrics = train_and_end(cfg, args, built, objective, state, train_ds, eval_ds, resume, tracked)
    distributed.close()
    return metrics


def train_and_end(cfg: Config, args: argparse.Namespace, built, objective, state, train_ds, eval_ds,
                  resume: Path | None, tracked) -> dict:
    """The scores before training, training, the scores after it and the run's end (metrics.json,
    curves.png), each sent to the trackers too; returns metrics.json's figures."""
    from minivlm import distributed
    from minivlm.data import skipped_rows
    from minivlm.evaluate import report
    from minivlm.finish import measured_before, trained_figures, write_results
    from minivlm.loop import NonFiniteLoss, train

    try:
        start = measured_before(cfg, built, eval_ds, objective, state, fresh=resume is None,
                                trackers=tracked)
        metrics = {"trainable_params": built.trainable_params, "total_params": built.total_params, **start["entries"]}
        result = train(cfg, built, objective, train_ds, eval_ds=eval_ds, resume=resume,
                       before=start["figures"] or None, state=state, trackers=tracked)
    except NonFiniteLoss as e:
        fail(str(e))
    # data.on_bad_sample = "fail" met a bad row, or a GRPO reward failed (rewards.RewardError): the
    # last save is intact
    except ConfigError as e:
        last = str(e).strip().splitlines()[-1]  # a DataLoader worker's error carries its traceback
        fail(f"{last}\nthe last checkpoint (if any) is intact; continue with: {resume_command(args)}")
    skipped = skipped_rows(train_ds)
    if skipped:  # the DataLoader workers' too (data.record_skipped)
        print(f"skipped {len(skipped)} bad row(s) (data.on_bad_sample = \"skip\"); list them all with: "
              f"python -m minivlm.data --config {args.config}")
    if result["signal"] is not None:
        name = signal.Signals(result["signal"]).name
        print(f"{name}: stopped after step {result['step']}, saved in {Path(cfg.train.output_dir) / 'last'}; "
              f"continue with: {resume_command(args)}")
        sys.exit(128 + result["signal"])  # the shell's convention for "ended by signal N"
    metrics.update(trained_figures(cfg, result))
    if eval_ds is not None:
        metrics.update(report("after", cfg, built, eval_ds, objective, state, tracked, result["step"])[1])
        print(f"training took {result['train_seconds']:.0f}s")
    if distributed.is_main():  # every rank scored the same gathered answers; rank 0 writes
        write_results(cfg, args, metrics, objective, eval_ds is not None)
        tracked.end(result["step"], cfg.train.output_dir)
    return metrics


if __name__ == "__main__":
    main()
