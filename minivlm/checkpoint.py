"""Checkpoints: the adapter, and everything needed to continue training bit for bit.

    <dir>/adapter.safetensors   trainable weights (LoRA A/B + train_modules), by parameter name
    <dir>/state.safetensors     every tensor of the optimizer, GradScaler and RNG states
    <dir>/state.json            the rest of those states (ints, floats, nesting), the step, the config

safetensors only stores flat name -> tensor maps, so nested states are split: tensors go to
state.safetensors under a path-like key, and state.json keeps the structure with a
{"__tensor__": key} placeholder where each tensor was.

A checkpoint is written to <dir>.tmp and renamed over <dir> when complete, so a crash while
saving never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, step: int, config: dict, loop_state: dict | None = None) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()}, tmp / "adapter.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()},
                      tensors, "s")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config, "state": skeleton,
                                                "loop": loop_state or {}}))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_adapter(directory: str | Path, model: nn.Module, partial: bool = False) -> list[str]:
    """Load adapter.safetensors into the model's trainable parameters; return the names loaded.

    By default every trainable parameter must be in the file and nothing else. `partial=True`
    loads whatever the two share (e.g. stage 1's projector into stage 2's projector + LoRA).
    """
    path = Path(directory) / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --checkpoint must be a directory written by train.py "
                                "(e.g. runs/demo/last)")
    saved = load_file(path)
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
                        scaler: torch.amp.GradScaler) -> tuple[int, dict]:
    """Restore optimizer, scaler and RNG states; return the step to continue from and the loop's state."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    state = _join(meta["state"], load_file(directory / "state.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return meta["step"], meta["loop"]
