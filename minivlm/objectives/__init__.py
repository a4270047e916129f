"""Training objectives: what an optimizer step optimizes, one module each (sft.py, dpo.py, grpo.py).

loop.train runs any of them the same way: it asks the objective for the micro-batches of a step,
the backward over them, the held-out figures, and a few facts, and knows nothing else about it.
An objective module provides:

  COUNT             what its windows count, as the step log names it ("answer_tokens", "pairs",
                    "completions")
  EXTRA_FORWARDS    forwards per step besides the policy's (DPO: the reference's): the FLOPs
                    that MFU is measured against
  PLOTTED           the held-out figure its curves and summary line show (None: data.metric)
  CURVE             (the step log's figure, its held-out counterpart) of the curves' left panel:
                    ("loss", "val_loss"); GRPO's ("reward", "val_reward")
  SHARES            step-log figures in [0, 1] that a third panel of the curves shows (GRPO's)
  collate(ds, indices, data_cfg, family, processor, generator) -> batch
  setup(cfg, built) -> state       what it needs before training (DPO: the reference weights);
                    a state with state_dict()/load_state_dict() is saved in every checkpoint
                    (GRPO's sampled window) and restored on --resume
  iterations(cfg) -> int           optimizer steps each window of samples serves (steps.py
                    repeats it; GRPO's grpo.iterations, else 1)
  planned(cfg) -> dict             what --dry-run's plan_memory needs to know of a step's rows
  backward_window(cfg, built, model, batches, scaler, state, filler) -> (loss, count, logged)
                    forward + backward over one accumulation window; `logged` goes into the
                    step's log line (with "tokens", the tokens its forwards ran over, where
                    the batches do not say: the loop's tokens/s takes them)
  shown(logged) -> progress-bar fields
  validation(cfg, built, ds, state, answers) -> {"val_loss" or "val_reward": ..., ...}
                    its figures on the eval split; `answers`: evaluate's greedy answers there
  report(when, figures) -> metrics.json entries, before and after training

Generation inside a step has its place in backward_window: it receives `built` (the model, its
processor and family) and whatever its own collate made of the rows. GRPO collates prompts and
images, samples with built.model.generate there, scores the completions and backpropagates, all
inside one window.

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
