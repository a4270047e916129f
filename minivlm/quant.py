"""4-bit quantization of a model's linear layers with bitsandbytes (the "Q" in QLoRA).

Each selected `nn.Linear` becomes a `bnb.nn.Linear4bit` whose weight is stored as 4-bit codes
in blocks of 64 values, each block with one absmax scale (Dettmers et al. 2023, §3):

    W  ≈  absmax_block · NF4[code]      NF4 = 16 quantiles of N(0, 1), normalised to [-1, 1]

Double quantization stores the absmax scales themselves in 8 bits (blocks of 256), saving
~0.37 bit per parameter (the QLoRA paper's figure). In forward, bitsandbytes dequantizes W to
`compute_dtype` and runs a normal matmul: the 4-bit weight only saves memory, the arithmetic is
bf16/fp16/fp32.

The scope is explicit: the vision tower, projector, embeddings and lm_head are small next to
the language model and sensitive to rounding, so families list them in `quant.skip`.

The packed codes are bytes (uint8) by default. Under FSDP (train.fsdp) they are stored in the
model's float dtype instead, two bytes of codes per bf16 "value": FSDP flattens each layer's
weights into one tensor of a single float dtype, and bitsandbytes reads the storage as bytes
whatever its dtype (`quant_storage`; bitsandbytes' docs/source/fsdp_qlora.md).

The float weights come straight from the checkpoint: `linear4bit_shells` puts empty 4-bit
layers in a model skeleton and minivlm/load.py fills each with `quantize_into` as its weight
is read, so the float model never exists whole. `quantize_linears` does the same for a model
already in memory.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from minivlm.modules import matches, replace_module


def linear4bit_shells(
    model: nn.Module,
    skip: list[str],
    compute_dtype: torch.dtype,
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage: torch.dtype = torch.uint8,
) -> list[str]:
    """Replace every `nn.Linear` outside `skip` by an empty `Linear4bit`, in place.

    The new layer's weight is on the meta device (no storage) until `quantize_into` fills it.
    Returns the names of the replaced layers.
    """
    names = [
        name for name, m in model.named_modules()
        # type() is, not isinstance: nn.MultiheadAttention's out_proj subclasses nn.Linear but
        # is read as a raw .weight by MHA's fused kernel, so it must stay a float Linear.
        if type(m) is nn.Linear and not any(matches(name, s, anywhere=True) for s in skip)
    ]
    for name in names:
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
            quant_storage=storage, device="meta",
        )
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place into an
        # inference-only layout the first time it runs in eval mode without grad; a training step
        # after that fails ("a view of a leaf Variable ... in-place"). We evaluate and train the
        # same modules, so keep the training layout.
        q.support_avx512bf16_for_cpu = False
        replace_module(model, name, q)
    return names


def quantize_into(layer: bnb.nn.Linear4bit, weight: torch.Tensor, device: torch.device) -> None:
    """Quantize a float `weight` into `layer`, on `device`, with the layer's quant_type and double quant.

    bitsandbytes quantizes in `Params4bit.to`: the float weight goes in, the 4-bit codes and
    their quant_state (absmax per block, code book, nested statistics) come out on `device`.
    `module=layer` gives the layer a copy of the quant_state: FSDP swaps its weight for a plain
    view of a flat parameter, and Linear4bit.forward takes the quant_state back from the layer.
    """
    shell = layer.weight
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=shell.compress_statistics,
                                     quant_type=shell.quant_type, quant_storage=shell.quant_storage,
                                     module=layer).to(device)


def quantize_linears(
    model: nn.Module,
    skip: list[str],
    compute_dtype: torch.dtype,
    device: torch.device,
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage: torch.dtype = torch.uint8,
) -> list[str]:
    """Replace every `nn.Linear` outside `skip` by a 4-bit `Linear4bit` on `device`, in place.

    For a model already in memory (LLaVA-Phi, assembled from two checkpoints; small test models):
    one layer at a time, so the device never holds the full-precision model, but the host already
    did. Transformers checkpoints load through `minivlm.load`, which quantizes while reading.
    Returns the names of the quantized layers.
    """
    floats = dict(model.named_modules())
    names = linear4bit_shells(model, skip, compute_dtype, quant_type, double_quant, storage)
    for name in names:
        linear, q = floats[name], model.get_submodule(name)
        quantize_into(q, linear.weight.data, device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    return names


def dequantized_weight(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The float weight (out, in) the 4-bit kernel computes with, in the layer's compute dtype."""
    # Under FSDP the weight is a plain view of a flat parameter: its quant_state is on the layer.
    fix_4bit_weight_quant_state_from_module(layer)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype)


def dequantize(layer: bnb.nn.Linear4bit) -> nn.Linear:
    """A float `nn.Linear` holding exactly the values the 4-bit kernel computes with."""
    w = dequantized_weight(layer)
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data)
    return out.requires_grad_(False)
