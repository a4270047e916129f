"""Model families: everything that differs between VLMs lives in one module each.

A family module provides:
  MODEL_CLASS       the transformers class loaded with from_pretrained
  QUANT_SKIP        modules kept unquantized by default
  LORA_TARGETS      modules wrapped by LoRA by default (suffix names)
  LORA_SKIP         modules never adapted by default
  load_processor(path)                         -> the family's real processor
  sequence_length(processor, prompt, answer)   -> tokens a training sample takes
  training_batch(processor, images, prompts, answers) -> tensors incl. labels (-100 = no loss)
  generation_batch(processor, images, prompts) -> left-padded tensors for model.generate
"""

from types import ModuleType

from minivlm.models import paligemma

FAMILIES: dict[str, ModuleType] = {"paligemma": paligemma}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
