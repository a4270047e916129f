"""Checkpoints: nested states survive safetensors, no crash loses a save, adapters must fit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_config
from minivlm import checkpoint
from minivlm.build import build
from minivlm.checkpoint import (_join, _split, latest_checkpoint, load_adapter, load_training_state, save_checkpoint,
                                saved_checkpoints)
from minivlm.data import load_split
from minivlm.loop import train
from minivlm.lora import inject_lora


def test_split_join_roundtrip_keeps_types_and_sharing():
    shared = torch.arange(4.0)
    state = {"state": {0: {"step": 3, "m": torch.ones(2), "qmap": shared}, 1: {"qmap": shared}},
             "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 1]}], "none": None}
    tensors = {}
    skeleton = _split(state, tensors, "s")
    assert len(tensors) == 2  # the shared map is stored once
    back = _join(skeleton, tensors)
    assert set(back["state"]) == {0, 1}  # int keys stay ints
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert back["state"][0]["qmap"] is back["state"][1]["qmap"]
    assert torch.equal(back["state"][0]["m"], torch.ones(2)) and back["state"][0]["step"] == 3


def small_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    inject_lora(model, targets=["0", "1"], skip=[], r=2, alpha=2, dropout=0.0)
    return model


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path / "run", model, opt, torch.amp.GradScaler("cpu", enabled=False), 1, {})
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    inject_lora(other, targets=["0"], skip=[], r=2, alpha=2, dropout=0.0)
    with pytest.raises(ValueError, match=r"does not fit this model.*unexpected \['1.lora_A'"):
        load_adapter(tmp_path / "run/last", other)
    with pytest.raises(FileNotFoundError, match="must be a directory written by train.py"):
        load_adapter(tmp_path / "nowhere", other)


def test_saves_are_pruned_but_never_the_best_and_old_layouts_are_kept(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step, best in [(1, False), (2, True), (3, False), (4, False)]:
        save_checkpoint(tmp_path, model, opt, scaler, step, {}, best=best, keep=2)
    assert [d.name for d in saved_checkpoints(tmp_path)] == ["step-00000002", "step-00000003", "step-00000004"]
    assert (tmp_path / "last").resolve().name == "step-00000004" and (tmp_path / "best").resolve().name == "step-00000002"
    assert (tmp_path / "last").is_symlink() and (tmp_path / "last/adapter.safetensors").is_file()
    # The same step saved again (a run resumed from an earlier save) gets its own directory.
    save_checkpoint(tmp_path, model, opt, scaler, 4, {}, keep=0)
    assert (tmp_path / "last").resolve().name == "step-00000004-2" and latest_checkpoint(tmp_path).name == "step-00000004-2"

    # minivlm's earlier layout: `last` was a directory. Resuming moves it in with the others.
    old = tmp_path / "old"
    save_checkpoint(old, model, opt, scaler, 7, {})
    legacy = old / "last"
    legacy.unlink()
    (old / "checkpoints/step-00000007").rename(legacy)
    assert latest_checkpoint(old) == old / "checkpoints/last-00000007"
    assert load_training_state(old / "last", opt, scaler)[0] == 7


class Crash(Exception):
    pass


def test_a_crash_at_any_filesystem_step_of_any_save_loses_nothing(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """Crash at the k-th file write, rename or delete of a run's saves, for every k: the run is
    resumed from what is on disk (or restarted, if nothing was saved yet) and ends bit-identical
    to a run that never crashed: the same last and best checkpoints, the same log."""
    def run(out, resume=None):
        cfg = tiny_config(tiny_paligemma, shapes_data, out, max_steps=6, save_every=2, eval_every=3,
                          keep_checkpoints=1, optimizer="adamw_8bit", batch_size=4)
        cfg.lora.dropout = 0.1  # the RNG state must come back too
        cfg.data.eval_samples = 4
        train(cfg, build(cfg), load_split(cfg.data, "train"), eval_ds=load_split(cfg.data, "test"), resume=resume)

    def outcome(out):
        last, best = (out / "last").resolve(), (out / "best").resolve()
        meta = json.loads((last / "state.json").read_text())
        log = [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
               for line in (out / "log.jsonl").read_text().splitlines()]
        return {"last": [(last / f).read_bytes() for f in ("adapter.safetensors", "state.safetensors")],
                "meta": (meta["step"], meta["loop"], meta["state"]), "best": (best / "adapter.safetensors").read_bytes(),
                "saves": [json.loads((d / "state.json").read_text())["step"] for d in saved_checkpoints(out)],
                "log": log, "leftovers": sorted(p.name for p in (out / "checkpoints").iterdir() if "." in p.name)}

    ops = []
    real = {name: getattr(checkpoint, name) for name in ("_write", "_replace", "_remove")}

    def partial_write(path, data):
        path.write_bytes(data[:len(data) // 2])  # a crash mid-write leaves half a file

    def partial_remove(path):
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
        if files:
            files[0].unlink()  # a crash mid-rmtree leaves a half-deleted directory

    def hooked(name, crash_at):
        def op(*args):
            ops.append(name)
            if len(ops) == crash_at:
                {"_write": partial_write, "_remove": partial_remove}.get(name, lambda *a: None)(*args)
                raise Crash(f"crash at {name}{args}")
            return real[name](*args)
        return op

    def crash_at(k):
        ops.clear()
        for name in real:
            monkeypatch.setattr(checkpoint, name, hooked(name, k))

    crash_at(0)
    run(tmp_path / "ref")
    expected, n_ops = outcome(tmp_path / "ref"), len(ops)
    # Untrained, accuracy stays 0: the best is step 3 (a tie is not better), kept while 2 and 4 go.
    assert expected["saves"] == [3, 6] and (tmp_path / "ref/best").resolve().name == "step-00000003"
    assert n_ops > 20
    for k in range(1, n_ops + 1):
        out = tmp_path / f"crash{k}"
        crash_at(k)
        with pytest.raises(Crash):
            run(out)
        for name in real:
            monkeypatch.setattr(checkpoint, name, real[name])
        run(out, resume=latest_checkpoint(out))  # None: nothing complete was saved, start over
        assert outcome(out) == expected, f"crash at filesystem step {k} of {n_ops} ({ops[-1]})"
