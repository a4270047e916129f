"""Streamed loading of the base model: quantized while it is read, one checkpoint tensor at a time.

`from_pretrained` followed by quantization holds the whole float model on the host first: as a
cast copy when `dtype` differs from the checkpoint's (≈16 GB for Idefics2-8B in bf16), else as a
memory-mapped view of the checkpoint whose pages stay resident once read. Instead:

1. Skeleton. The model class is built from the checkpoint's config.json with every parameter
   on PyTorch's meta device (a shape and a dtype, no storage). Buffers stay real: rotary
   `inv_freq` and SigLIP's `position_ids` are computed in __init__, not read from the checkpoint.
2. Shells. The linears to quantize become empty `Linear4bit` layers (quant.linear4bit_shells).
3. Stream. The safetensors files are read one tensor at a time. Each checkpoint key is renamed
   to the model's parameter name by transformers' own rules (its save_pretrained writes
   PaliGemma as `language_model.model.layers.…`, the module is `model.language_model.layers.…`).
   A 4-bit layer's weight is quantized on its way to the device; anything else is cast to
   `dtype` and moved there. Either takes the place of its meta parameter.
4. Finish as from_pretrained does: tie lm_head to embed_tokens where the config says so, read
   generation_config.json, eval mode.

Host memory then peaks at one float tensor (read, and cast to `dtype`) above what the loaded model
occupies on the host, nothing of it when the device is a GPU: never the float model. (Plus what
the C allocator keeps of freed tensors: docs/log.md, issue 9.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.utils import cached_file

from minivlm.quant import linear4bit_shells, quantize_into


def load_pretrained(
    model_class: type[PreTrainedModel],
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    load_in_4bit: bool,
    skip: list[str],
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage: torch.dtype = torch.uint8,
    config_overrides: dict | None = None,
) -> tuple[PreTrainedModel, list[str]]:
    """The checkpoint at `path` (a directory or a cached hub id) as `model_class`, on `device`.

    With `load_in_4bit`, every nn.Linear outside `skip` is quantized as its weight is read.
    `storage`: the dtype the packed 4-bit codes are kept in (see quant.py). `config_overrides`:
    config.json values to replace, as from_pretrained's keyword arguments do.
    Returns the model and the names of its Linear4bit layers. A path without a config.json or
    safetensors weights raises OSError, as from_pretrained does.
    """
    model, files = skeleton(model_class, path, dtype, config_overrides)
    quantized = linear4bit_shells(model, skip, dtype, quant_type, double_quant, storage) if load_in_4bit else []
    if tied_4bit := [t for t in model.all_tied_weights_keys if t.rpartition(".")[0] in quantized]:
        raise ValueError(f"{tied_4bit} share their weight with float embeddings: keep them in quant.skip")
    names = parameter_names(model, files)
    for file, keys in names.items():
        # pread, not mmap: each tensor is read into memory of its own and freed once placed;
        # pages of a memory-mapped file would stay resident until the file is closed.
        with safe_open(file, framework="pt", backend="pread") as f:
            for key, name in keys.items():
                put(model, name, f.get_tensor(key), dtype, device)
    loaded = {name for keys in names.values() for name in keys.values()}
    model.tie_weights(missing_keys=set(model.state_dict()) - loaded, recompute_mapping=False)
    model.to(device)  # the buffers made in __init__
    model.config.name_or_path = str(path)
    if model.can_generate():
        with suppress(OSError):  # no generation_config.json: keep the one derived from config.json
            model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), quantized


def skeleton(model_class: type[PreTrainedModel], path: str, dtype: torch.dtype,
             config_overrides: dict | None = None) -> tuple[PreTrainedModel, list[str]]:
    """The model built from config.json with its parameters on the meta device; the checkpoint's files."""
    config = model_class.config_class.from_pretrained(path, **(config_overrides or {}))
    files = checkpoint_files(path)
    with parameters_on_meta():
        model = model_class._from_config(config, dtype=dtype)
    return model, files


def float_weights(model_class: type[PreTrainedModel], path: str, dtype: torch.dtype,
                  config_overrides: dict | None = None) -> Callable[[str], torch.Tensor]:
    """A reader of one linear's float weight from the checkpoint, by module name, cast to `dtype`.

    For lora_init on a 4-bit base: the loaded model holds Q(W), and PiSSA, OLoRA and LoftQ need W.
    Each call reads one tensor from disk: one layer's W in memory at a time.
    """
    model, files = skeleton(model_class, path, dtype, config_overrides)
    where = {name: (file, key) for file, keys in parameter_names(model, files).items() for key, name in keys.items()}

    def read(module: str) -> torch.Tensor:
        file, key = where[f"{module}.weight"]
        with safe_open(file, framework="pt", backend="pread") as f:
            return f.get_tensor(key).to(dtype)
    return read


@contextmanager
def parameters_on_meta():
    """Modules built inside this block get their parameters on the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index lists."""
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        return [cached_file(path, "model.safetensors")]  # OSError when absent
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    return [cached_file(path, shard) for shard in shards]


def parameter_names(model: PreTrainedModel, files: list[str]) -> dict[str, dict[str, str]]:
    """{file: {checkpoint key: parameter or buffer name in `model`}}, checked before any tensor is read.

    Keys are renamed with the mapping from_pretrained uses (transformers' conversion_mapping).
    Raises ValueError when the checkpoint lacks something the model needs (tied weights may
    come from their partner) or holds something the model has no place for.
    """
    expected = model.state_dict()  # every parameter and persistent buffer, meta or not
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names, unexpected = {}, []
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = f.keys()
        names[file] = {}
        for key in keys:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if converter is not None:  # e.g. fused expert weights, split by transformers at load
                raise NotImplementedError(f"{key}: this checkpoint needs transformers' {converter!r} tensor "
                                          "conversion, which minivlm's streamed loader does not do")
            if name in expected:
                names[file][key] = name
            elif not ignored_on_load(model, name):
                unexpected.append(key)
    loaded = {name for keys in names.values() for name in keys.values()}
    tied = model.all_tied_weights_keys  # {target: source}, e.g. lm_head.weight -> embed_tokens.weight
    partner = {**tied, **{source: target for target, source in tied.items()}}
    missing = sorted(n for n in expected if n not in loaded and partner.get(n) not in loaded)
    if missing or unexpected:
        raise ValueError(f"checkpoint {files[0]} does not match {type(model).__name__}: "
                         f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    return names


def ignored_on_load(model: PreTrainedModel, name: str) -> bool:
    """Keys from_pretrained drops too: buffers that older checkpoints saved and models now compute."""
    patterns = [*(model._keys_to_ignore_on_load_unexpected or []), r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"]
    return any(re.search(p, name) for p in patterns)


def put(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """Put one checkpoint tensor in place of the meta parameter (or buffer) `name`, on `device`."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    expected = getattr(module, attr)
    if tensor.shape != expected.shape:
        raise ValueError(f"{name}: the checkpoint's tensor is {tuple(tensor.shape)}, the model's {tuple(expected.shape)}")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        quantize_into(module, tensor, device)
    elif attr in module._buffers:
        module._buffers[attr] = tensor.to(device)
    else:  # a frozen 4-bit layer's bias is frozen too; anything else trains unless LoRA freezes it
        trainable = tensor.is_floating_point() and not isinstance(module, bnb.nn.Linear4bit)
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=trainable)
