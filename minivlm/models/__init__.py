"""Model families: everything that differs between VLMs lives in one module each.

A family module provides:
  MODEL_CLASS       the transformers class loaded with from_pretrained
  QUANT_SKIP        modules kept unquantized by default
  LORA_TARGETS      modules wrapped by LoRA by default (suffix names)
  LORA_SKIP         modules never adapted by default
  load_processor(path)                                       -> the family's real processor
  training_batch(processor, images, dialogs, system)          -> tensors incl. labels (-100 = no loss)
  generation_batch(processor, images, prompts, system)       -> left-padded tensors for model.generate

A dialog is a list of (user, assistant) exchanges; most data has one. Chat-template families
share their batching in `chat.py`.
"""

from types import ModuleType

from minivlm.models import idefics, idefics2, llava_phi2, paligemma, smolvlm

FAMILIES: dict[str, ModuleType] = {"paligemma": paligemma, "idefics2": idefics2, "idefics": idefics,
                                   "smolvlm": smolvlm, "llava_phi2": llava_phi2}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
