"""Checkpoints: nested states survive safetensors, saving is atomic, adapters must fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minivlm import checkpoint
from minivlm.checkpoint import _join, _split, load_adapter, load_training_state, save_checkpoint
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


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(tmp_path / "last", model, opt, scaler, step=5, config={})
    before = (tmp_path / "last/adapter.safetensors").read_bytes()

    real = checkpoint.save_file
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last", model, opt, scaler, step=9, config={})
    assert (tmp_path / "last/adapter.safetensors").read_bytes() == before
    assert load_training_state(tmp_path / "last", opt, scaler) == (5, {})


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path / "ck", model, opt, torch.amp.GradScaler("cpu", enabled=False), 1, {})
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    inject_lora(other, targets=["0"], skip=[], r=2, alpha=2, dropout=0.0)
    with pytest.raises(ValueError, match=r"does not fit this model.*unexpected \['1.lora_A'"):
        load_adapter(tmp_path / "ck", other)
    with pytest.raises(FileNotFoundError, match="must be a directory written by train.py"):
        load_adapter(tmp_path / "nowhere", other)
