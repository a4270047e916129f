"""Experiment trackers: what a run writes to log.jsonl, also sent where users already look.

train.report_to names them: "tensorboard", "wandb", "mlflow", "trackio". Four events, one method
each on `Trackers`:

    start     the config, as hyperparameters ("train.lr": 0.0002, flattened as every tracker wants)
    log       every record log.jsonl gets, its numbers only: a step's loss, lr, grad norm, tokens/s,
              DPO's or GRPO's figures; an evaluation's scores
    samples   an evaluation's first answers, as a table (prompt, answer, references)
    end       metrics.json's figures (as "final/<key>"), curves.png and metrics.json themselves

Each tracker is an optional extra (pyproject.toml: pip install 'minivlm[wandb]'), imported only
when named; `check_installed` says which is missing before the model loads. Under torchrun only
rank 0 reports (`start` gives the other ranks no tracker). A resumed run continues the tracker's
run: <output_dir>/trackers.json keeps each one's id, TensorBoard's writer drops what was logged
after the step it resumes from, and W&B and MLflow reopen the run by its id, Trackio by its name.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import time
from pathlib import Path

from minivlm.checkpoint import write_atomic
from minivlm.config import Config, ConfigError, to_dict

# train.report_to's names (config.TRACKERS) -> (the module imported, the pip package that provides it).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}
SAMPLES = 8  # answers per evaluation sent as a table: enough to read, small at every evaluation


def check_installed(names: list[str]) -> None:
    """Every tracker named is importable: a missing one is one line with the pip command, before
    any model is read."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to names {name!r}, which is not installed; install it with "
                              f"pip install 'minivlm[{name}]' (or pip install {package}), or take it out of "
                              "train.report_to")


def flatten(config: dict) -> dict:
    """{"train": {"lr": 2e-4}} -> {"train.lr": 2e-4}: every tracker's hyperparameters are flat."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def numbers(record: dict) -> dict[str, float]:
    """A log record's numbers; "step" is where they go, not one of them (nor a skipped step's reason)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in <output_dir>/tensorboard (`tensorboard --logdir runs`)."""

    def __init__(self, cfg: Config, out: Path, saved: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard's reader drops the events a killed run logged after its last
        # save, so the resumed steps are not drawn twice.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            config = json.dumps(to_dict(cfg), indent=2)
            self.writer.add_text("config", "\n".join("    " + line for line in config.splitlines()))  # markdown code
        self.id = str(out / "tensorboard")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def table(self, step: int, rows: list[dict]) -> None:
        head = "| prompt | answer | references |\n|---|---|---|\n"
        self.writer.add_text("samples", head + "".join(
            f"| {r['prompt']} | {r['answer']} | {' / '.join(r['references'])} |\n" for r in rows), step)

    def files(self, step: int, curves: Path, metrics: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(curves) as image:
            self.writer.add_image("curves", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.add_text("metrics.json", "    " + metrics.read_text().replace("\n", "\n    "), step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (WANDB_MODE=offline keeps it in <output_dir>/wandb until `wandb sync`)."""

    def __init__(self, cfg: Config, out: Path, saved: dict, resumed_at: int | None):
        import wandb

        self.lib = wandb
        self.id = saved.get("wandb") or secrets.token_hex(4)  # W&B's run ids: short, url-safe
        self.run = wandb.init(project=cfg.train.project, name=cfg.train.run_name or out.name, id=self.id,
                              resume="allow", dir=out)
        # On resume the keys a resume may change (train.max_steps...) are allowed to.
        self.run.config.update(flatten(to_dict(cfg)), allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def table(self, step: int, rows: list[dict]) -> None:
        table = self.lib.Table(columns=["prompt", "answer", "references"],
                               data=[[r["prompt"], r["answer"], " / ".join(r["references"])] for r in rows])
        self.run.log({"samples": table}, step=step)

    def files(self, step: int, curves: Path, metrics: Path) -> None:
        self.run.log({"curves": self.lib.Image(str(curves))}, step=step)
        self.run.summary.update(json.loads(metrics.read_text()))
        self.run.save(str(metrics), base_path=str(metrics.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment train.project, at MLflow's own tracking URI (MLFLOW_TRACKING_URI;
    unset, ./mlflow.db)."""

    def __init__(self, cfg: Config, out: Path, saved: dict, resumed_at: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if saved.get("mlflow"):
            self.id = saved["mlflow"]
            self.client.update_run(self.id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(cfg.train.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.train.project)
            self.id = self.client.create_run(experiment_id, run_name=cfg.train.run_name or out.name).info.run_id
            # Params are write-once in MLflow: logged by the fresh run only. log_batch takes at most 100.
            params = [Param(k, str(v)) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def table(self, step: int, rows: list[dict]) -> None:
        self.client.log_dict(self.id, rows, f"samples/step_{step:06d}.json")

    def files(self, step: int, curves: Path, metrics: Path) -> None:
        self.client.log_artifact(self.id, str(curves))
        self.client.log_artifact(self.id, str(metrics))

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackio(WandB):
    """A Trackio run, in its local database (TRACKIO_DIR; `trackio show` draws it). Trackio copies
    W&B's API (init, log, Table, Image, finish): log, table and close are W&B's."""

    def __init__(self, cfg: Config, out: Path, saved: dict, resumed_at: int | None):
        import trackio

        self.lib = trackio
        # Trackio finds a run by its name: the resumed run reopens the name the fresh one chose.
        self.id = saved.get("trackio") or cfg.train.run_name or out.name
        self.run = trackio.init(project=cfg.train.project, name=self.id, config=flatten(to_dict(cfg)),
                                resume="never" if resumed_at is None else "allow", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)

    def files(self, step: int, curves: Path, metrics: Path) -> None:
        self.run.log({"curves": self.lib.Image(str(curves))}, step=step)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


class Trackers:
    """The trackers of one run; every event goes to each. With none named (or on a rank other
    than 0) every event is a no-op, so the loop calls them unconditionally. A context manager:
    leaving it closes each tracker's run (a signal, an error, or the end alike), so a resume can
    reopen it."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    def log(self, record: dict) -> None:
        values = numbers(record)
        for backend in self.backends if values else []:
            backend.log(record["step"], values)

    def samples(self, step: int, answers: dict) -> None:
        """The first answers of an evaluation (evaluate.evaluate's result)."""
        if not self.backends:
            return
        rows = [{"prompt": p, "answer": a, "references": r} for p, a, r in
                list(zip(answers["prompts"], answers["predictions"], answers["references"]))[:SAMPLES]]
        for backend in self.backends:
            backend.table(step, rows)

    def end(self, step: int, output_dir: str | Path) -> None:
        """The run's end: metrics.json's numbers, and the files write_results wrote."""
        out = Path(output_dir)
        metrics = json.loads((out / "metrics.json").read_text())
        self.log({"step": step, **{f"final/{k}": v for k, v in metrics.items()}})
        for backend in self.backends:
            backend.files(step, out / "curves.png", out / "metrics.json")

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        for backend in self.backends:
            backend.close()


def start(cfg: Config, resumed_at: int | None, main: bool = True) -> Trackers:
    """Open each tracker of train.report_to, sending the config: a fresh run's (resumed_at None)
    new runs, or, resuming from step `resumed_at`, the runs <output_dir>/trackers.json names."""
    if not cfg.train.report_to or not main:
        return Trackers()
    check_installed(cfg.train.report_to)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trackers.json"
    saved = json.loads(path.read_text()) if resumed_at is not None and path.is_file() else {}
    backends = []
    for name in cfg.train.report_to:
        try:
            backends.append(BACKENDS[name](cfg, out, saved, resumed_at))
        except Exception as e:  # the tracker's own errors, of its own types: a store it cannot open, a login
            Trackers(backends).__exit__()
            raise ConfigError(f"train.report_to: {name} could not start a run ({type(e).__name__}: {e}); fix "
                              f"that, or take {name!r} out of train.report_to") from None
    write_atomic(path, json.dumps({name: b.id for name, b in zip(cfg.train.report_to, backends)}, indent=2).encode())
    return Trackers(backends)
