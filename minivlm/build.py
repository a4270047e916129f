"""From config to a QLoRA-ready model: load, quantized as read -> (checkpointing) -> inject LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from transformers import PreTrainedModel

from minivlm.config import Config, ConfigError
from minivlm.load import load_pretrained
from minivlm.lora import count_parameters, inject_lora
from minivlm.models import get_family
from minivlm.quant import quantize_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    model: nn.Module
    processor: object
    family: ModuleType
    device: torch.device
    quantized: list[str]  # names of the Linear4bit layers
    adapted: list[str]  # names of the LoRALinear layers
    trainable_params: int
    total_params: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg: Config) -> Built:
    """Load the base model named in the config and make it ready for QLoRA training."""
    family = get_family(cfg.model.family)
    device = pick_device(cfg.train.device)
    dtype = DTYPES[cfg.model.dtype]
    quant = cfg.quant
    skip = family.QUANT_SKIP if quant.skip is None else quant.skip
    try:
        processor = family.load_processor(cfg.model.name_or_path)
        if issubclass(family.MODEL_CLASS, PreTrainedModel):
            # Streamed: read one tensor at a time, each 4-bit weight quantized as it arrives, straight
            # to the device. The host never holds the float model.
            model, quantized = load_pretrained(family.MODEL_CLASS, cfg.model.name_or_path, dtype, device,
                                               quant.load_in_4bit, skip, quant.quant_type, quant.double_quant)
        else:
            # LLaVA-Phi is assembled from two checkpoints by its own from_pretrained: loaded whole in
            # float on the host, then quantized one layer at a time onto the device.
            model = family.MODEL_CLASS.from_pretrained(cfg.model.name_or_path, dtype=dtype)
            quantized = (quantize_linears(model, skip, dtype, device, quant.quant_type, quant.double_quant)
                         if quant.load_in_4bit else [])
            model.to(device)
    except OSError as e:
        raise ConfigError(f"cannot load model.name_or_path = {cfg.model.name_or_path!r}: {e}\n"
                         "Point it at a local directory holding the checkpoint, or a hub id "
                         "that is already in the Hugging Face cache.") from None
    if cfg.train.gradient_checkpointing:
        # Each decoder layer keeps only its input and recomputes the rest in backward. The
        # non-reentrant variant tracks gradients through the recomputation itself, so adapters
        # get theirs although the layer's input (from frozen embeddings) requires no grad.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers then also makes every input embedding's output require grad (a fix for the
        # reentrant variant). One of them is the frozen vision tower's patch embedding: the whole
        # tower would then keep its activations and run backward for a gradient nobody reads.
        model.disable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(cfg.train.seed)  # A's random init
    adapted = inject_lora(
        model,
        targets=family.LORA_TARGETS if cfg.lora.targets is None else cfg.lora.targets,
        skip=family.LORA_SKIP if cfg.lora.skip is None else cfg.lora.skip,
        r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, train_modules=cfg.lora.train_modules,
        shared_dropout=cfg.lora.shared_dropout,
    )
    trainable, total = count_parameters(model)
    return Built(model, processor, family, device, quantized, adapted, trainable, total)
