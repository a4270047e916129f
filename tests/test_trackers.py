"""train.report_to: what log.jsonl gets reaches TensorBoard, W&B, MLflow and Trackio, each read back
offline with its own reader, and a resumed run continues each tracker's run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT, tiny_config
from minivlm import config as config_module
from minivlm import trackers
from minivlm.cli import train
from minivlm.config import ConfigError, from_dict

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]


def offline(monkeypatch, tmp_path: Path) -> None:
    """Every tracker local: W&B offline, MLflow in a file store, Trackio's database in the session's
    TRACKIO_DIR (conftest.py)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores for those who ask


def run_demo(tiny_paligemma, shapes_data, out: Path, steps: int, *extra: str, resume: bool = False) -> dict:
    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", f"train.output_dir={out}",
            f"train.max_steps={steps}", "train.batch_size=4", "train.eval_every=1", "data.eval_samples=4",
            f"train.report_to={json.dumps(ALL)}", "train.run_name=tiny", "train.project=trackers-test", *extra]
    return train.main(["--config", str(ROOT / "configs/demo.toml"), *sum((["--set", s] for s in sets), []),
                       *(["--resume"] if resume else [])])


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: W&B's LevelDB-style log (a 7-byte header, then
    32 KiB blocks of chunks: crc32, length, type; a record spans FIRST..LAST chunks), each chunk's
    bytes a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def test_every_tracker_gets_the_log_the_samples_and_the_end_and_a_resume_continues_its_run(
        tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    out = tmp_path / "run"
    run_demo(tiny_paligemma, shapes_data, out, 2)
    first_ids = json.loads((out / "trackers.json").read_text())
    # A killed run's leftovers: TensorBoard got a step 3 that no save holds. The resumed run logs its own.
    with SummaryWriter(str(out / "tensorboard")) as stale:
        stale.add_scalar("loss", 99.0, 3)
    metrics = run_demo(tiny_paligemma, shapes_data, out, 4, resume=True)
    assert json.loads((out / "trackers.json").read_text()) == first_ids

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    accuracy = {r["step"]: r["accuracy"] for r in log if "accuracy" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(accuracy) == [0, 1, 2, 3, 4]

    # TensorBoard, read by its own reader: each step once, the stale step 3 purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars == pytest.approx(losses, rel=1e-6)  # event files hold float32
    assert {e.step: e.value for e in events.Scalars("accuracy")} == pytest.approx(accuracy)
    assert events.Scalars("final/accuracy_after")[-1].value == pytest.approx(metrics["accuracy_after"])
    assert "curves" in events.Tags()["images"]
    texts = {e.step for e in events.Tensors("samples/text_summary")}
    assert texts == {0, 1, 2, 3, 4}  # before training, every evaluation, and after (at step 2 and 4)

    # W&B offline: two run directories (one per process) of the same run id, holding the history.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {first_ids["wandb"]}
    history, config = {}, {}
    for run in runs:
        for record in wandb_records(next(run.glob("*.wandb"))):
            if record.WhichOneof("record_type") == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(item["_step"], {}).update(item)
            elif record.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == losses
    assert history[4]["final/accuracy_after"] == metrics["accuracy_after"]
    assert config["train.lr"] == pytest.approx(3e-3) and config["train.max_steps"] == 4
    assert list(runs[1].glob("files/media/table/samples_*.table.json"))
    assert (runs[1] / "files/metrics.json").is_file()

    # MLflow: search_runs finds one run, with the whole loss history and the files.
    import mlflow
    from mlflow.tracking import MlflowClient
    found = mlflow.search_runs(experiment_names=["trackers-test"], output_format="list")
    assert [r.info.run_id for r in found] == [first_ids["mlflow"]]
    assert found[0].data.metrics["loss"] == losses[4] and found[0].data.params["train.run_name"] == "tiny"
    client = MlflowClient()
    assert {m.step: m.value for m in client.get_metric_history(first_ids["mlflow"], "loss")} == losses
    artifacts = {a.path for a in client.list_artifacts(first_ids["mlflow"])}
    assert {"curves.png", "metrics.json", "samples"} <= artifacts

    # Trackio: its local database holds one run of that name, with every step.
    from trackio.sqlite_storage import SQLiteStorage
    assert SQLiteStorage.get_runs("trackers-test") == ["tiny"]
    logs = SQLiteStorage.get_logs("trackers-test", "tiny")
    assert {r["step"]: r["loss"] for r in logs if "loss" in r} == losses
    assert any("samples" in r for r in logs) and any("curves" in r for r in logs)


def test_a_tracker_not_installed_is_one_line_with_the_pip_command_before_the_model_loads(
        tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    monkeypatch.setattr("minivlm.build.build", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as exit_:
        run_demo(tiny_paligemma, shapes_data, tmp_path / "run", 1)
    assert str(exit_.value).startswith("error: train.report_to names 'wandb', which is not installed")
    assert "pip install 'minivlm[wandb]'" in str(exit_.value) and "\n" not in str(exit_.value)


def test_a_tracker_that_cannot_start_is_named(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 refuses a file store without it
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path / "run", report_to=["tensorboard", "mlflow"])
    with pytest.raises(ConfigError, match=r"train.report_to: mlflow could not start a run \(MlflowException: .*"
                                          r"take 'mlflow' out of train.report_to"):
        trackers.start(cfg, None)


def test_only_rank_0_reports_and_none_named_is_no_tracker(tiny_paligemma, shapes_data, tmp_path):
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path / "run", report_to=["tensorboard"])
    assert trackers.start(cfg, None, main=False).backends == []
    assert not (tmp_path / "run").exists()
    assert trackers.start(tiny_config(tiny_paligemma, shapes_data, tmp_path / "run"), None).backends == []
    with trackers.start(cfg, None) as opened:
        assert [type(b) for b in opened.backends] == [trackers.TensorBoard]


def test_report_to_names_are_checked_and_each_has_a_tracker():
    assert set(config_module.TRACKERS) == set(trackers.BACKENDS) == set(trackers.PACKAGES)
    with pytest.raises(ConfigError, match="train.report_to has 'wanb', which is not one of .*did you mean 'wandb'"):
        from_dict({"train": {"report_to": ["wanb"]}})
