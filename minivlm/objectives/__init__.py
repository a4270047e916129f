"""Training objectives: what an optimizer step optimizes, one module each (sft.py, dpo.py).

loop.train runs any of them the same way: it asks the objective for the micro-batches of a step,
the backward over them, the held-out figures, and a few facts, and knows nothing else about it.
An objective module provides:

  COUNT             what its windows count, as the step log names it ("answer_tokens", "pairs")
  ROWS_PER_SAMPLE   rows one sample puts through the forward (DPO: chosen and rejected): the
                    batch the memory planner counts
  EXTRA_FORWARDS    forwards per step besides the policy's (DPO: the reference's): the FLOPs
                    that MFU is measured against
  PLOTTED           the held-out figure its curves and summary line show (None: data.metric)
  collate(ds, indices, data_cfg, family, processor, generator) -> batch
  setup(cfg, built) -> state       what it needs before training (DPO: the reference weights)
  backward_window(cfg, built, model, batches, scaler, state, filler) -> (loss, count, logged)
                    forward + backward over one accumulation window; `logged` goes into the
                    step's log line
  shown(logged) -> progress-bar fields
  validation(cfg, built, ds, state) -> {"val_loss": ..., ...}   its figures on the eval split
  report(when, figures) -> metrics.json entries, before and after training

Generation inside a step has its place in backward_window: it receives `built` (the model, its
processor and family) and whatever its own collate made of the rows. An objective that samples
answers before it can score them (GRPO) collates prompts and images, generates with
built.model.generate there, scores the answers and backpropagates, all inside one window.

Adding an objective is one module here and its name in config.OBJECTIVES. Nothing outside this
folder (and the config, which validates its keys) asks which objective runs; the library
modules never import this folder, which imports them: train.py looks the objective up and
hands it to loop.train.
"""

import importlib
from types import ModuleType

from minivlm.config import OBJECTIVES


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {list(OBJECTIVES)}")
    return importlib.import_module(f"minivlm.objectives.{name}")
