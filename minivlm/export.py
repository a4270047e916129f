"""Hand a fine-tune over: as a PEFT adapter, or merged into a plain transformers checkpoint.

    python -m minivlm.export --config C --checkpoint runs/x/best --out dir            # PEFT layout
    python -m minivlm.export --config C --checkpoint runs/x/best --out dir --merge    # merged model

The PEFT layout is what `PeftModel.from_pretrained(base, dir)` reads: adapter_config.json and
adapter_model.safetensors with PEFT's key names,

    ours: model.language_model.layers.0.self_attn.q_proj.lora_A
    PEFT: base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight

The merged checkpoint dequantizes every 4-bit layer, folds W + (alpha/r)·BA into it
(LoRALinear.merge), and saves the model with `save_pretrained` and its processor, so that
`AutoModelForImageTextToText.from_pretrained(dir)` loads it without minivlm, PEFT or bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from minivlm import plain_warnings
from minivlm.config import Config, ConfigError, check_output_path, load_config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from minivlm.build import Built

# torch, transformers and bitsandbytes are imported where they are used: `--help` and a mistake in
# the arguments answer at once, not after seconds of imports.


def peft_key(name: str) -> str:
    """Our parameter name as PEFT's adapter file spells it; modules trained in full (train_modules,
    PEFT's modules_to_save) keep their own names."""
    if name.endswith((".lora_A", ".lora_B")):
        return f"base_model.model.{name}.weight"
    if name.endswith(".lora_magnitude"):  # DoRA's m
        return f"base_model.model.{name}_vector"
    return f"base_model.model.{name}"


def on_the_original_base(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PiSSA / OLoRA / LoftQ adapter rewritten for the checkpoint's own W, as PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) does.

    Trained, the layer computes W_res + s·BA with W_res = W − s·B₀A₀ (lora_init), which is
    W + s·(BA − B₀A₀) = W + s·B'A' with A' = [A; A₀] (2r × in) and B' = [B, −B₀] (out × 2r). For
    LoftQ, W_res was Q_T and this holds up to LoftQ's own error, W − Q_T − s·B₀A₀.
    """
    import torch

    from minivlm.lora import LoRALinear

    out = dict(state)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            out[f"{name}.lora_A"] = torch.cat([layer.lora_A.detach(), layer.lora_A0], dim=0)
            out[f"{name}.lora_B"] = torch.cat([layer.lora_B.detach(), -layer.lora_B0], dim=1)
    return out


def export_peft(cfg: Config, built: Built, out: str | Path) -> Path:
    """Write `built.model`'s adapters (and train_modules) in PEFT's LoRA layout."""
    from safetensors.torch import save_file

    from minivlm.checkpoint import atomic_directory
    from minivlm.lora import trainable_state_dict

    state = trainable_state_dict(built.model)
    r, alpha = cfg.lora.r, cfg.lora.alpha
    if cfg.lora.init != "default":
        state = on_the_original_base(built.model, state)
        r, alpha = 2 * r, alpha * (2 ** 0.5 if cfg.lora.use_rslora else 2)  # the same s at rank 2r
    tensors = {peft_key(name): p.detach().contiguous() for name, p in state.items()}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": cfg.model.name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(built.adapted), "modules_to_save": cfg.lora.train_modules or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": cfg.lora.use_rslora, "use_dora": cfg.lora.use_dora,
    }
    with atomic_directory(out) as tmp:  # whole or absent: a crash never leaves half an adapter
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)


def export_merged(built: Built, out: str | Path) -> Path:
    """Merge the adapters, dequantize what is left in 4-bit, save a plain transformers checkpoint."""
    import bitsandbytes as bnb
    from transformers import PreTrainedModel

    from minivlm.checkpoint import atomic_directory
    from minivlm.lora import merge_lora
    from minivlm.modules import replace_module
    from minivlm.quant import dequantize

    if not isinstance(built.model, PreTrainedModel):
        raise ConfigError(f"--merge writes a transformers checkpoint, and {type(built.model).__name__} is not a "
                          "transformers model; export its adapter without --merge")
    model = merge_lora(built.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):  # quantized but not adapted
            replace_module(model, name, dequantize(module))
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        built.processor.save_pretrained(tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True, help="a directory written by train.py (runs/x/last or best)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", action="store_true", help="merge into a plain checkpoint instead of a PEFT adapter")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    plain_warnings()
    try:
        cfg = load_config(args.config, args.set)
        check_output_path(args.out, "--out", directory=True)
        from minivlm.build import build
        from minivlm.checkpoint import load_adapter
        built = build(cfg)
        load_adapter(args.checkpoint, built.model)
        out = export_merged(built, args.out) if args.merge else export_peft(cfg, built, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
