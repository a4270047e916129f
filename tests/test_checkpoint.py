"""Checkpoints: nested states survive safetensors, no crash loses a save, adapters must fit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from conftest import count_steps, tiny_config
from minivlm import checkpoint, loop
from minivlm.objectives import sft
from minivlm.build import build
from minivlm.checkpoint import (_join, _split, latest_checkpoint, load_adapter, load_training_state, recover,
                                save_checkpoint, saved_checkpoints)
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


def saver(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def save(out, step, best=False, keep=0, loop=None):
        return save_checkpoint(out, model, opt, scaler, step, {}, loop, best=best, keep=keep)

    return save, opt, scaler


def names(out):
    return [d.name for d in saved_checkpoints(out)]


def test_training_state_round_trips(tmp_path):
    """What a resume needs besides the adapter comes back from a save as it was: the optimizer's
    moments and step, a GradScaler's scale after overflows have lowered it (fp16), and the RNG
    state that draws the next dropout masks."""
    _, opt, _ = saver(tmp_path)
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(1))  # the scale exists once something was scaled
    scaler.update(new_scale=2.0 ** 7)  # what fp16 overflows leave behind
    torch.manual_seed(123)
    saved = save_checkpoint(tmp_path, nn.Linear(1, 1), opt, scaler, 5, {})
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    next_draw = torch.rand(3)

    fresh = torch.optim.AdamW(params)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    torch.manual_seed(0)
    assert load_training_state(saved, fresh, fresh_scaler)[0] == 5
    assert all(torch.equal(fresh.state[p]["exp_avg"], m) for p, m in zip(params, moments))
    assert all(fresh.state[p]["step"] == 1 for p in params)
    assert fresh_scaler.get_scale() == 2.0 ** 7
    assert torch.equal(torch.rand(3), next_draw), "the RNG state was not restored: other dropout masks"


def test_saves_are_pruned_but_never_the_best(tmp_path):
    save, _, _ = saver(tmp_path)
    for step, best in [(1, False), (2, True), (3, False), (4, False)]:
        save(tmp_path, step, best=best, keep=2)
    assert names(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert (tmp_path / "last").resolve().name == "step-00000004" and (tmp_path / "best").resolve().name == "step-00000002"
    assert (tmp_path / "last").is_symlink() and (tmp_path / "last/adapter.safetensors").is_file()
    # The same step saved again (a run resumed from an earlier save) gets its own directory.
    save(tmp_path, 4)
    assert (tmp_path / "last").resolve().name == "step-00000004-2" and latest_checkpoint(tmp_path).name == "step-00000004-2"


def test_resuming_an_older_save_keeps_it_and_its_own_best(tmp_path):
    """A run resumed from an older save forks: its best is the one that save knew, not a newer
    best of the abandoned future, and the save it resumed from is not pruned before it is used."""
    save, _, _ = saver(tmp_path)
    loop = {}
    for step, best in [(1, True), (2, False), (3, True), (4, False)]:
        save(tmp_path, step, best=best, loop=loop)  # keep = 0: all four stay
    resumed = tmp_path / "checkpoints/step-00000002"
    known = json.loads((resumed / "state.json").read_text())["loop"]["best_checkpoint"]
    assert known == "step-00000001" and (tmp_path / "best").resolve().name == "step-00000003"
    recover(tmp_path, keep=1, resumed=resumed, best=known)  # the resumed run keeps 1 save
    assert (tmp_path / "best").resolve().name == "step-00000001"
    assert names(tmp_path) == ["step-00000001", "step-00000002", "step-00000004"]  # best, resumed, newest
    # Its next save, of step 3, is the newest, though an older one holds step 4: --resume takes it.
    save(tmp_path, 3, loop=loop)
    assert latest_checkpoint(tmp_path).name == "step-00000003" == (tmp_path / "last").resolve().name


@pytest.mark.parametrize("layout", [["last", "best"], ["last.old", "last.tmp"], ["best", "last.old", "last"]])
def test_the_earlier_layout_is_moved_in_nothing_lost(tmp_path, layout):
    """Before checkpoints/, `last` and `best` were the checkpoint directories, and a crash between
    the two renames of a save left last.old (older) and last.tmp (newer)."""
    save, opt, scaler = saver(tmp_path)
    for step, name in enumerate(layout, 1):
        new = save(tmp_path / "new", 10 * step)
        (tmp_path / "new/last").unlink()
        new.rename(tmp_path / name)
    newest = 10 * len(layout)
    assert load_training_state(latest_checkpoint(tmp_path), opt, scaler)[0] == newest
    recover(tmp_path)
    assert sorted(names(tmp_path)) == sorted(f"legacy-{n.replace('.', '-')}-{10 * i:08d}" for i, n in enumerate(layout, 1))
    assert load_training_state(tmp_path / "last", opt, scaler)[0] == newest
    if "best" in layout:
        assert (tmp_path / "best").resolve().name.startswith("legacy-best-")


class Crash(Exception):
    pass


class Crasher:
    """Makes the k-th file write, rename or delete of checkpoint.py crash, half done: a write
    leaves half a file, a delete half a directory. k = 0 never crashes; `ops` counts them."""

    NAMES = ("_write", "_replace", "_remove")

    def __init__(self, monkeypatch):
        self.monkeypatch, self.ops = monkeypatch, []
        self.real = {name: getattr(checkpoint, name) for name in self.NAMES}

    def at(self, k: int) -> None:
        self.ops.clear()
        for name in self.NAMES:
            self.monkeypatch.setattr(checkpoint, name, self._hooked(name, k))

    def off(self) -> None:
        for name in self.NAMES:
            self.monkeypatch.setattr(checkpoint, name, self.real[name])

    def _hooked(self, name, k):
        def op(*args):
            self.ops.append(name)
            if len(self.ops) == k:
                if name == "_write":
                    args[0].write_bytes(args[1][:len(args[1]) // 2])
                elif name == "_remove" and args[0].is_dir() and not args[0].is_symlink():
                    next((f for f in args[0].rglob("*") if f.is_file()), args[0] / "none").unlink(missing_ok=True)
                raise Crash(f"crash at {name}{args}")
            return self.real[name](*args)
        return op


def test_a_crash_at_any_filesystem_step_of_any_save_loses_nothing(tiny_paligemma, shapes_data, tmp_path, monkeypatch):
    """Crash at the k-th file write, rename or delete of a run's saves, for every k. Once a save
    has completed, what the crash leaves holds a complete save: the newest complete one (or the
    one being written, if the crash came after its rename), and the resumed run starts from its
    step, not from 0 (counted: it trains only the steps after it). It then ends bit-identical to a
    run that never crashed: the same last and best checkpoints, the same log."""
    def run(out, resume=None):
        cfg = tiny_config(tiny_paligemma, shapes_data, out, max_steps=6, save_every=2, eval_every=3,
                          keep_checkpoints=1, optimizer="adamw_8bit", batch_size=4)
        cfg.lora.dropout = 0.1  # the RNG state must come back too
        cfg.data.eval_samples = 4
        train(cfg, build(cfg), sft, load_split(cfg.data, "train"), eval_ds=load_split(cfg.data, "test"), resume=resume)

    def outcome(out):
        last, best = (out / "last").resolve(), (out / "best").resolve()
        meta = json.loads((last / "state.json").read_text())
        log = [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s") and k != "seconds"}  # timings
               for line in (out / "log.jsonl").read_text().splitlines()]
        return {"last": [(last / f).read_bytes() for f in ("adapter.safetensors", "state.safetensors")],
                "meta": (meta["step"], meta["loop"], meta["state"]), "best": (best / "adapter.safetensors").read_bytes(),
                "saves": [json.loads((d / "state.json").read_text())["step"] for d in saved_checkpoints(out)],
                "log": log, "leftovers": sorted(p.name for p in (out / "checkpoints").iterdir() if "." in p.name)}

    # Which save the loop started last, which ones returned, and how many steps a run trained.
    saving, saved, trained = [], [], count_steps(monkeypatch, sft)
    real_save = loop.save_checkpoint

    def tracked_save(out, model, optimizer, scaler, step, *args, **kwargs):
        saving.append(step)
        path = real_save(out, model, optimizer, scaler, step, *args, **kwargs)
        saved.append(step)
        return path

    monkeypatch.setattr(loop, "save_checkpoint", tracked_save)
    crash = Crasher(monkeypatch)
    crash.at(0)
    run(tmp_path / "ref")
    expected, n_ops = outcome(tmp_path / "ref"), len(crash.ops)
    # Untrained, accuracy stays 0: the best is step 3 (a tie is not better), kept while 2 and 4 go.
    assert expected["saves"] == [3, 6] and (tmp_path / "ref/best").resolve().name == "step-00000003"
    assert saving == [2, 3, 4, 6] and n_ops > 20
    for k in range(1, n_ops + 1):
        out = tmp_path / f"crash{k}"
        saving.clear(), saved.clear()
        crash.at(k)
        with pytest.raises(Crash):
            run(out)
        crash.off()
        writing = saving[-1] if saving else None  # the log is written through checkpoint.py too
        where = f"crash at filesystem step {k} of {n_ops} ({crash.ops[-1]}, saving step {writing})"
        found = latest_checkpoint(out)  # None: nothing complete was saved, start over
        resumed_from = json.loads((found / "state.json").read_text())["step"] if found else 0
        if saved:
            assert found is not None, f"{where}: the saves of steps {saved} are all lost"
            assert resumed_from in (saved[-1], writing), f"{where}: resumes from step {resumed_from}"
        else:
            assert resumed_from in (0, writing), where
        trained.clear()
        run(out, resume=found)
        assert len(trained) == 6 - resumed_from, where
        assert outcome(out) == expected, where


def test_a_crash_inside_recover_is_finished_by_the_next_one(tmp_path, monkeypatch):
    """recover() itself (moving the earlier layout in, clearing leftovers, re-pointing, pruning)
    crashed at each of its steps, then run again, ends as if it had never crashed."""
    def crashed_run(out):
        save, _, _ = saver(out)
        (out / "old").mkdir(parents=True)
        save(out / "old", 9)
        (out / "old/last").unlink()
        (out / "old/checkpoints/step-00000009").rename(out / "last.old")  # the earlier layout
        loop = {}
        for step, best in [(10, True), (11, False), (12, False), (13, False)]:
            save(out, step, best=best, loop=loop)
        half = out / "checkpoints/step-00000014.tmp"  # a save that crashed while writing
        half.mkdir()
        (half / "adapter.safetensors").write_bytes(b"half")
        (out / "checkpoints/step-00000011").rename(out / "checkpoints/step-00000011.del")  # a prune that crashed
        (out / "last").unlink()  # a pointer swap that crashed
        os.symlink("checkpoints/step-00000012", out / "last.tmp")
        return loop["best_checkpoint"]

    def outcome(out):
        return {"saves": names(out), "last": (out / "last").resolve().name, "best": (out / "best").resolve().name,
                "leftovers": sorted(p.name for p in [*(out / "checkpoints").iterdir(), *out.iterdir()] if "." in p.name)}

    crash = Crasher(monkeypatch)
    best = crashed_run(tmp_path / "ref")
    crash.at(0)
    recover(tmp_path / "ref", keep=2, best=best)
    expected, n_ops = outcome(tmp_path / "ref"), len(crash.ops)
    assert expected == {"saves": ["step-00000010", "step-00000012", "step-00000013"], "last": "step-00000013",
                        "best": "step-00000010", "leftovers": []}  # legacy-last-old-9 and 11 pruned
    assert n_ops >= 8  # moves, leftovers removed, pointers swapped, prunes
    for k in range(1, n_ops + 1):
        out = tmp_path / f"crash{k}"
        crash.off()
        crashed_run(out)
        crash.at(k)
        with pytest.raises(Crash):
            recover(out, keep=2, best=best)
        crash.off()
        recover(out, keep=2, best=best)
        assert outcome(out) == expected, f"crash at step {k} of {n_ops} of recover ({crash.ops[-1]})"


def test_an_export_directory_appears_whole_or_not_at_all(tmp_path):
    """atomic_directory (the exports): an export that fails half way leaves the one before it as
    it was; one that succeeds replaces it whole, nothing of the old left inside."""
    from minivlm.checkpoint import atomic_directory
    out = tmp_path / "export"
    with atomic_directory(out) as d:
        (d / "adapter_model.safetensors").write_bytes(b"first")
        (d / "old-only.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "old-only.json"]
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as d:
            (d / "adapter_model.safetensors").write_bytes(b"sec")  # the process dies here
            raise RuntimeError("killed")
    assert (out / "adapter_model.safetensors").read_bytes() == b"first"
    with atomic_directory(out) as d:
        (d / "adapter_model.safetensors").write_bytes(b"second")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp, no .old
