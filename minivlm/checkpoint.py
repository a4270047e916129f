"""Checkpoints: the adapter, and everything needed to continue training bit for bit.

An output directory holds one directory per save, never changed once complete, and two
pointers to them:

    <output_dir>/checkpoints/step-00000400/
        adapter.safetensors   trainable weights (LoRA A/B + train_modules), by parameter name
        state.safetensors     every tensor of the optimizer, GradScaler and RNG states, and of the
                              objective's (GRPO: the sampled batch its next iterations train on)
        state.json            the rest of those states, the step, the config, the save's number
    <output_dir>/last  ->  checkpoints/step-00000400     (relative symlinks, so
    <output_dir>/best  ->  checkpoints/step-00000300      runs/x/last/adapter.safetensors works)

safetensors only stores flat name -> tensor maps, so nested states are split: tensors go to
state.safetensors under a path-like key, and state.json keeps the structure with a
{"__tensor__": key} placeholder where each tensor was.

No crash can lose or block a checkpoint (a kill -9, a power cut, the OOM killer, at any point):

    1. write the files into checkpoints/<name>.tmp/, each fsync'ed
    2. rename it to checkpoints/<name>/                 <- the save happens here, atomically
    3. point `last` (and `best`) at it: a new symlink renamed over the old one, atomically
    4. delete saves beyond train.keep_checkpoints: renamed to <name>.del first, then removed

A directory under checkpoints/ without a suffix is therefore always complete, and state.json
numbers the saves, so `--resume` takes the newest by that number, whatever the pointers say.
Leftovers of an interrupted save (.tmp, .del) are ignored, and removed by the next run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from minivlm.distributed import unwrapped_name
from minivlm.lora import trainable_state_dict


def _split(obj, tensors: dict, path: str, seen: dict | None = None):
    """Replace every tensor in a nested structure by a placeholder; collect tensors by key.

    One tensor object met twice (bitsandbytes shares its quantization maps between all
    parameters' states) is stored once and referenced twice, so loading shares it again.
    """
    seen = {} if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) not in seen:
            seen[id(obj)] = path
            tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": seen[id(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, tensors, f"{path}.{k}", seen) for k, v in obj.items()}
        # Optimizer states are keyed by int param ids; JSON keys would turn them into strings.
        return {"__items__": [[k, _split(v, tensors, f"{path}.{k}", seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write(path: Path, data: bytes) -> None:
    """Write a file and fsync it: after a crash it is either complete or not part of a checkpoint."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory's entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    """os.replace: atomic on POSIX, so `dst` is the old or the new thing, never neither."""
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a small file (the log, metrics.json) so that a crash leaves the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, data)
    _replace(tmp, path)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a directory that appears whole or not at all (an export): yields `<path>.tmp` to write
    into, then renames it to `path`. A directory already there is replaced, moved aside first:
    a crash leaves the old one, or none and the new one complete as `<path>.tmp`."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    _remove(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if path.exists():
        _remove(old)
        _replace(path, old)
    _replace(tmp, path)
    _remove(old)


def _point(link: Path, target: Path) -> bool:
    """Make `link` a relative symlink to `target`, replacing what was there in one rename; False
    (and nothing touched) if it already is one."""
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return False
    tmp = link.with_name(link.name + ".tmp")
    _remove(tmp)
    os.symlink(relative, tmp)
    _replace(tmp, link)
    return True


def _meta(directory: Path) -> dict | None:
    """state.json of a complete checkpoint directory, else None."""
    try:
        return json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _saves(out: Path) -> list[tuple[Path, dict]]:
    """(directory, state.json) of every complete save under <out>/checkpoints, oldest first:
    by save number, then step (saves moved in from the earlier layout have no number)."""
    root = out / "checkpoints"
    found = [(d, meta) for d in (root.iterdir() if root.is_dir() else [])
             if d.is_dir() and "." not in d.name and (meta := _meta(d)) is not None]
    return sorted(found, key=lambda dm: (dm[1].get("saved", 0), dm[1]["step"], dm[0].name))


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete saves of a run, oldest first."""
    return [d for d, _ in _saves(Path(output_dir))]


# minivlm's layout before checkpoints/: `last` and `best` were the checkpoints themselves, and a
# crash between its two renames left the newest one as last.tmp (the older as last.old).
LEGACY = ("last", "last.tmp", "last.old", "best", "best.tmp", "best.old")


def _legacy(out: Path) -> list[tuple[Path, dict]]:
    found = [(out / n, _meta(out / n)) for n in LEGACY if (out / n).is_dir() and not (out / n).is_symlink()]
    return sorted([(d, m) for d, m in found if m is not None], key=lambda dm: dm[1]["step"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete save of a run (what --resume continues), or None."""
    out = Path(output_dir)
    saves = _saves(out) or _legacy(out)
    return saves[-1][0] if saves else None


def recover(output_dir: str | Path, keep: int = 0, resumed: Path | None = None, best: str | None = None) -> list[str]:
    """Finish what a crash interrupted, before a run goes on; returns what it did, in words
    (nothing: the run was as it should be).

    Moves checkpoints of the earlier layout into checkpoints/; removes leftovers of interrupted
    saves; points `last` at the newest save and `best` at `best` (the name the resumed save's
    loop state holds: in a run resumed from an older save, a newer best belongs to the
    abandoned future); prunes to `keep` saves, never `resumed` nor the best.
    """
    out = Path(output_dir)
    root = out / "checkpoints"
    done = []
    for directory, meta in _legacy(out):
        root.mkdir(exist_ok=True)
        name = f"legacy-{directory.name.replace('.', '-')}-{meta['step']:08d}"
        _replace(directory, root / name)
        done.append(f"moved {directory.name} to checkpoints/{name}")
        if directory.name.startswith("best"):
            best = name
    if not root.is_dir():
        return done
    for leftover in [*root.glob("*.tmp"), *root.glob("*.del"), out / "last.tmp", out / "best.tmp"]:
        if leftover.exists() or leftover.is_symlink():
            _remove(leftover)
            done.append(f"removed the leftover {leftover.relative_to(out)}")
    saves = saved_checkpoints(out)
    if saves and _point(out / "last", saves[-1]):
        done.append(f"pointed last at {saves[-1].name}")
    if best is not None and (root / best).is_dir():
        if _point(out / "best", root / best):
            done.append(f"pointed best at {best}")
    elif best is not None and (out / "best").is_symlink():
        _remove(out / "best")  # pruned in the abandoned future: no save holds this run's best any more
        done.append("removed best, whose save is gone")
    pruned = _prune(out, saves, keep, protect=resumed)
    return done + [f"pruned {p.name}" for p in pruned]


def save_checkpoint(output_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, step: int, config: dict, loop_state: dict | None = None,
                    best: bool = False, keep: int = 0, world_size: int = 1, objective_state: dict | None = None) -> Path:
    """Save a checkpoint of `step` under <output_dir>/checkpoints; point `last` (and, if `best`, `best`)
    at it; then delete all but the `keep` newest saves and the best (keep = 0: delete none).

    A best save writes its own name into `loop_state["best_checkpoint"]`, so that every later
    save knows which one is the best (see `recover`). `world_size`, the number of data-parallel
    ranks that trained it, goes into state.json: a resume must use as many (see train.py).
    `objective_state`: what the objective carries from step to step (a nested dict of tensors and
    numbers; GRPO's sampled batch), or None.
    """
    out = Path(output_dir)
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    earlier = _saves(out)
    # A step saved before (by a run resumed from an earlier save) is never overwritten: step-N-2.
    name, k = f"step-{step:08d}", 1
    while any((root / f"{name}{suffix}").exists() for suffix in ("", ".tmp", ".del")):
        k += 1
        name = f"step-{step:08d}-{k}"
    loop_state = {} if loop_state is None else loop_state
    if best:
        loop_state["best_checkpoint"] = name
    tmp, final = root / f"{name}.tmp", root / name

    tmp.mkdir()
    _write(tmp / "adapter.safetensors",
           save({unwrapped_name(k): v.contiguous() for k, v in trainable_state_dict(model).items()}))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                       "objective": objective_state}, tensors, "s")
    _write(tmp / "state.safetensors", save(tensors))
    number = max((meta.get("saved", 0) for _, meta in earlier), default=0) + 1
    _write(tmp / "state.json", json.dumps({"step": step, "saved": number, "config": config,
                                           "state": skeleton, "loop": loop_state,
                                           "world_size": world_size}).encode())
    _fsync_dir(tmp)
    _replace(tmp, final)

    _point(out / "last", final)
    if best:
        _point(out / "best", final)
    _prune(out, [d for d, _ in earlier] + [final], keep)
    return final


def _prune(out: Path, saves: list[Path], keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the `keep` newest of `saves` (oldest first), the best and `protect`
    (keep = 0: delete none); returns the deleted."""
    if not keep:
        return []
    spared = {p.resolve() for p in (out / "best", protect) if p is not None and p.exists()}
    doomed = [old for old in saves[:-keep] if old.resolve() not in spared]
    for old in doomed:
        gone = old.with_name(old.name + ".del")
        _replace(old, gone)  # no longer a checkpoint before any of its files goes
        _remove(gone)
    return doomed


def read_adapter(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The trainable tensors a save holds, by parameter name (DPO's reference reads them too)."""
    path = Path(directory) / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --checkpoint must be a directory written by train.py "
                                "(e.g. runs/demo/last)")
    return load_file(path, device=str(device))


def read_state(directory: str | Path) -> dict | None:
    """A save's state.json (the step, the config, the loop's state, the world size), or None if
    `directory` holds no save."""
    return _meta(Path(directory))


def load_adapter(directory: str | Path, model: nn.Module, partial: bool = False) -> list[str]:
    """Load a save's adapter into the model's trainable parameters; return the names loaded.

    By default every trainable parameter must be in the file and nothing else. `partial=True`
    loads whatever the two share (e.g. stage 1's projector into stage 2's projector + LoRA).
    """
    path = Path(directory) / "adapter.safetensors"
    saved = read_adapter(directory)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    names = sorted(expected & set(saved)) if partial else sorted(saved)
    if (not names) if partial else set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{path} does not fit this model (was it trained with another [lora] config?): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name in names:
            if params[name].shape != saved[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(saved[name])
    return names


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler) -> tuple[int, dict, dict | None]:
    """Restore optimizer, scaler and RNG states; return the step to continue from, the loop's state
    and the objective's (save_checkpoint's `objective_state`)."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    state = _join(meta["state"], load_file(directory / "state.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return meta["step"], meta["loop"], state.get("objective")
