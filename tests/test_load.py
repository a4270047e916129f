"""Streamed loading (minivlm/load.py) gives exactly the model that from_pretrained + quantize_linears gives:
every parameter and buffer, the 4-bit codes and their quant_state, tying, the logits."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from conftest import tiny_config
from minivlm.build import build
from minivlm.config import ConfigError
from minivlm.load import load_pretrained
from minivlm.models import get_family
from minivlm.quant import quantize_linears

CPU = torch.device("cpu")


def reference(family: str, path, dtype: torch.dtype, load_in_4bit: bool = True):
    """The load as build() did it before streaming: the float model on the host, then quantized."""
    fam = get_family(family)
    model = fam.MODEL_CLASS.from_pretrained(path, dtype=dtype)
    if load_in_4bit:
        quantize_linears(model, fam.QUANT_SKIP, dtype, CPU)
    return model.to(CPU)


def streamed(family: str, path, dtype: torch.dtype, load_in_4bit: bool = True):
    fam = get_family(family)
    return load_pretrained(fam.MODEL_CLASS, str(path), dtype, CPU, load_in_4bit, fam.QUANT_SKIP)[0]


def assert_same_tensor(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b), name
    assert (a.dtype, a.device, a.shape, a.requires_grad) == (b.dtype, b.device, b.shape, b.requires_grad), name
    assert torch.equal(a, b), name
    if isinstance(a, bnb.nn.Params4bit):  # absmax, code book, nested absmax/code/offset, blocksize, shape...
        sa, sb = a.quant_state.as_dict(), b.quant_state.as_dict()
        assert sa.keys() == sb.keys() and "nested_absmax" in sa, name
        for k in sa:
            same = torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
            assert same, f"{name}: quant_state {k}"


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, same_path: bool = True) -> None:
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    for named in ("named_parameters", "named_buffers"):
        ta, tb = dict(getattr(a, named)(remove_duplicate=False)), dict(getattr(b, named)(remove_duplicate=False))
        assert ta.keys() == tb.keys(), named
        for name in ta:
            assert_same_tensor(name, ta[name], tb[name])
        # The same tensors are shared (tied) in both.
        assert {n: id(t) for n, t in ta.items()}.keys() == tb.keys()
        assert sorted(sorted(n for n in ta if ta[n] is t) for t in ta.values()) == \
            sorted(sorted(n for n in tb if tb[n] is t) for t in tb.values())
    assert a.training == b.training
    ca, cb = a.config.to_dict(), b.config.to_dict()
    if not same_path:
        del ca["_name_or_path"], cb["_name_or_path"]
    assert ca == cb
    assert a.generation_config.to_dict() == b.generation_config.to_dict()


def batch(family: str, path) -> dict:
    processor = get_family(family).load_processor(str(path))
    images = [[Image.new("RGB", (40, 30), (200, 40, 0))], [Image.new("RGB", (30, 50), (0, 90, 200))]]
    dialogs = [[("what shape is it", "circle")], [("where is it", "top left")]]
    return get_family(family).training_batch(processor, images, dialogs)


def assert_same_logits(family: str, path, a, b) -> None:
    inputs = batch(family, path)
    inputs.pop("labels")
    with torch.no_grad():
        la, lb = a(**inputs).logits, b(**inputs).logits
    assert la.abs().sum() > 0 and torch.equal(la, lb)


CASES = [("paligemma", torch.float32), ("paligemma", torch.bfloat16), ("idefics2", torch.float32),
         ("smolvlm", torch.float32), ("smolvlm", torch.bfloat16), ("idefics", torch.float32)]


@pytest.mark.parametrize("family,dtype", CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CASES])
def test_streamed_4bit_load_equals_from_pretrained_then_quantize(family, dtype, request):
    path = request.getfixturevalue(f"tiny_{family}")
    ref, model = reference(family, path, dtype), streamed(family, path, dtype)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert_same_model(model, ref)
    assert_same_logits(family, path, model, ref)


def test_streamed_float_load_equals_from_pretrained(tiny_paligemma):
    ref = reference("paligemma", tiny_paligemma, torch.bfloat16, load_in_4bit=False)
    model = streamed("paligemma", tiny_paligemma, torch.bfloat16, load_in_4bit=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert_same_model(model, ref)
    assert_same_logits("paligemma", tiny_paligemma, model, ref)


def test_sharded_checkpoint_loads_the_same(tiny_paligemma, tmp_path):
    sharded = tmp_path / "sharded"
    get_family("paligemma").MODEL_CLASS.from_pretrained(tiny_paligemma).save_pretrained(sharded, max_shard_size="100KB")
    AutoProcessor.from_pretrained(tiny_paligemma).save_pretrained(sharded)
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    model = streamed("paligemma", sharded, torch.float32)
    assert_same_model(model, streamed("paligemma", tiny_paligemma, torch.float32), same_path=False)
    assert_same_model(model, reference("paligemma", sharded, torch.float32))


def test_lm_head_is_tied_to_the_embeddings(tiny_paligemma):
    with safe_open(str(tiny_paligemma / "model.safetensors"), framework="pt") as f:
        assert not any("lm_head" in k for k in f.keys())  # save_pretrained leaves the tied copy out
    model = streamed("paligemma", tiny_paligemma, torch.float32)
    embeddings = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embeddings and embeddings.device.type == "cpu"


def test_linears_are_quantized_without_a_float_copy(tiny_paligemma, monkeypatch):
    """The 4-bit layers get their weight from the checkpoint tensor itself: no float nn.Linear is built."""
    made = []
    real_init = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: made.append(self.weight.device.type)
                        or real_init(self))
    model = streamed("paligemma", tiny_paligemma, torch.float32)
    assert made and set(made) == {"meta"}  # every Linear of the skeleton, float ones too, had no storage
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_tied_lm_head_cannot_be_4bit(tiny_paligemma):
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] share their weight"):
        load_pretrained(get_family("paligemma").MODEL_CLASS, str(tiny_paligemma), torch.float32, CPU, True, skip=[])


def rewrite_checkpoint(src, dst, edit) -> None:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_errors(tiny_paligemma, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    rewrite_checkpoint(tiny_paligemma, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"missing \['model.language_model.layers.1.mlp.up_proj.weight'\]"):
        streamed("paligemma", tmp_path / "missing", torch.float32)
    rewrite_checkpoint(tiny_paligemma, tmp_path / "unexpected",
                       lambda t: t.update({"language_model.model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"missing nothing, unexpected \['language_model.model.extra.weight'\]"):
        streamed("paligemma", tmp_path / "unexpected", torch.float32)


def test_not_a_checkpoint_is_a_config_error(tiny_paligemma, shapes_data, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_paligemma.iterdir():
        if f.name != "model.safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    for path, message in ((tmp_path / "nowhere", f"not found: {tmp_path / 'nowhere'}"),
                          (no_weights, "cannot load model.name_or_path")):
        with pytest.raises(ConfigError, match=message):
            build(tiny_config(path, shapes_data, tmp_path / "run"))
