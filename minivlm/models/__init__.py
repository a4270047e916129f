"""Model families: everything that differs between VLMs lives in one module each.

A family module provides:
  NAME              how messages name it ("PaliGemma")
  CHAT              whether its prompt format is a chat template: a system turn, multi-turn dialogs
  MODEL_CLASS       the transformers class loaded with from_pretrained
  QUANT_SKIP        modules kept unquantized by default
  LORA_TARGETS      modules wrapped by LoRA by default (suffix names)
  LORA_SKIP         modules never adapted by default
  load_processor(path)                                       -> the family's real processor
  training_batch(processor, images, dialogs, system)          -> tensors incl. labels (-100 = no loss)
  generation_batch(processor, images, prompts, system)       -> left-padded tensors for model.generate

A dialog is a list of (user, assistant) exchanges; most data has one. Chat-template families
share their batching in `chat.py`.

Families import nothing from the rest of minivlm: everything else is built on them.
"""

import importlib
from types import ModuleType

# Each family's module, by family name. A module is imported only when its family is asked for
# (get_family): the modules import torch and transformers (seconds), and checking the family
# name of a config, all `train.py --help` or a config mistake needs, should not.
FAMILIES: dict[str, str] = {name: f"minivlm.models.{name}"
                            for name in ("paligemma", "idefics2", "idefics", "smolvlm", "llava_phi2")}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
