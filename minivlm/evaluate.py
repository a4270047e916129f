"""Evaluation: greedy answers and their score (data.metric), the objective's held-out figures, and the
scores before and after training that metrics.json keeps.

`scores` is what the loop logs every train.eval_every steps (and as step 0); `report` is the same
before and after training, printed with a few answers, and `save_metrics` writes metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import datasets
import torch
from PIL import Image
from transformers import DynamicCache

from minivlm import distributed
from minivlm.build import DTYPES, Built
from minivlm.checkpoint import write_atomic
from minivlm.config import Config
from minivlm.batches import check_samples, samples
from minivlm.data import references_of, to_rgb
from minivlm.models.chat import Video, media_counts
from minivlm.precision import autocast, model_inputs
from minivlm.metrics import METRICS, clip_scores
from minivlm.trackers import Trackers


@torch.no_grad()
def generated(cfg: Config, built: Built, batch: dict[str, torch.Tensor], **settings) -> torch.Tensor:
    """The tokens `generate` appends to `batch` (the family's generation_batch), the model in eval
    mode (no dropout) and the configured precision; `settings` are generate's (greedy, or GRPO's
    sampling). Left padding makes every prompt end at the same column, where the new tokens start."""
    model = built.model
    was_training = model.training
    model.eval()
    inputs = model_inputs(batch, built.device, DTYPES[cfg.model.dtype])
    with autocast(cfg, built.device):
        if settings.get("num_return_sequences", 1) > 1 and getattr(built.family, "PREFILL_ONCE", True):
            inputs = prefilled_once(model, inputs, settings.pop("num_return_sequences"))
        out = model.generate(**inputs, use_cache=True, **settings)
    model.train(was_training)
    return out[:, batch["input_ids"].shape[1]:]


def prefilled_once(model: torch.nn.Module, inputs: dict[str, torch.Tensor], group: int) -> dict:
    """generate's inputs for `group` completions of each prompt, the prompts run through the model once.

    generate(num_return_sequences=G) copies every prompt G times before its first forward:
    transformers encodes each image once (mm_encoder_outputs) but the decoder prefills each prompt
    G times, image tokens included (PaliGemma's 256). Here generate prefills the prompts alone (one
    greedy token, dropped: no random draw), their KV cache is copied G times in generate's order (a
    prompt's G rows together), and generate goes on from it. The cache gives up the last prompt
    token, which generate runs again for the first logits: its keys and values come out the same,
    as in the prefill it attended to every prompt token too (in PaliGemma's bidirectional prefix
    as well). Sliding-window layers record their past for that (transformers drops what leaves the
    window). The images' tensors stay out (the cache holds what they made); the per-token ones (ids,
    mask, token types) are copied, and so is what transformers keeps on the model between prefill
    and decoding: Qwen-VL's per-row M-RoPE offset (rope_deltas).
    """
    ids = inputs["input_ids"]
    cache = DynamicCache(config=model.config.get_text_config())
    for layer in cache.layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    cache = model.generate(**inputs, cache=cache, max_new_tokens=1, do_sample=False, use_cache=True,
                           return_dict_in_generate=True).cache
    cache.crop(-1)
    cache.batch_repeat_interleave(group)
    for module in model.modules():
        if isinstance(getattr(module, "rope_deltas", None), torch.Tensor):
            module.rope_deltas = module.rope_deltas.repeat_interleave(group, 0)
    per_token = {key: value.repeat_interleave(group, 0) for key, value in inputs.items()
                 if value.shape[:2] == ids.shape}
    return {**per_token, "cache": cache}


def answer(cfg: Config, built: Built, images: list[list[Image.Image]], prompts: list[str]) -> list[str]:
    """Greedy-decode one answer per (images, prompt), as a batch."""
    check_samples(built.family, images, [[(p, "")] for p in prompts], cfg.data.system_prompt)
    batch = built.family.generation_batch(built.processor, [[m if isinstance(m, Video) else to_rgb(m) for m in ims]
                                                            for ims in images], prompts, system=cfg.data.system_prompt)
    # synced_gpus: under FSDP a rank whose answers are done keeps stepping until all are, since
    # every forward gathers weights from every rank.
    new_tokens = generated(cfg, built, batch, max_new_tokens=cfg.train.max_new_tokens, do_sample=False,
                           synced_gpus=distributed.is_sharded(built.model))
    return [s.strip() for s in built.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def evaluate(cfg: Config, built: Built, ds: datasets.Dataset, batch_size: int = 16) -> dict:
    """data.metric of greedy answers on `ds` (the first data.eval_samples rows if set), over the
    rows that are not bad samples (data.on_bad_sample decides: skipped, or an error). A conversation
    is scored on its first exchange, with the images of its first user turn.

    Under torchrun each rank answers its share of the rows, and every rank scores all the answers,
    gathered in row order: some metrics (BLEU, CIDEr) are not means over samples, and every rank
    must reach the same verdict on best checkpoints and early stopping."""
    rows = distributed.shard(min(cfg.data.eval_samples or len(ds), len(ds)), built.model)
    clip = cfg.data.metric == "clip_score"  # the one metric that reads the images, not the references
    prompts, predictions, references, clip_per_sample, numbers = [], [], [], [], []
    for i in range(rows.start, rows.stop, batch_size):
        scored = samples(ds, list(range(i, min(i + batch_size, rows.stop))), cfg.data, built.family)
        if not scored:
            continue
        first = [dialog[0][0] for *_, dialog in scored]
        images = [ims[:media_counts(dialog, len(ims))[0]] for _, _, ims, dialog in scored]
        answers = answer(cfg, built, images, first)
        if clip:  # scored batch by batch, so the split's images are never all in memory; a sample by its first
            clip_per_sample += clip_scores([ims[0] for ims in images], answers, cfg.data.clip_model, built.device)
        predictions += answers
        prompts += first
        references += [references_of(cfg.data, row) for _, row, _, _ in scored]
        numbers += [index for index, *_ in scored]
    prompts, predictions, references, clip_per_sample, numbers = (distributed.gather(x, built.model) for x in (
        prompts, predictions, references, clip_per_sample, numbers))
    if not predictions:
        raise ValueError(f"the eval split has no rows to score {cfg.data.metric} on")
    score = (sum(clip_per_sample) / len(clip_per_sample) if clip
             else METRICS[cfg.data.metric](predictions, references))
    return {"metric": cfg.data.metric, "score": score, "n": len(references), "prompts": prompts,
            "predictions": predictions, "references": references, "rows": numbers}


def scores(cfg: Config, built: Built, ds: datasets.Dataset, objective: ModuleType, state,
           answers: dict | None = None) -> dict[str, float]:
    """The eval split's figures: the objective's (`state`: its setup's; GRPO scores the greedy answers
    with its rewards) and data.metric of `answers` (evaluate's, made here if not given)."""
    answers = answers or evaluate(cfg, built, ds)
    figures = objective.validation(cfg, built, ds, state, answers)
    return {**figures, cfg.data.metric: answers["score"]}


def show(when: str, scored: dict) -> None:
    print(f"{scored['metric']} {when} training: {scored['score']:.3f} on {scored['n']} held-out samples")
    for q, p, r in list(zip(scored["prompts"], scored["predictions"], scored["references"]))[:4]:
        print(f"  {q!r:28} -> {p!r:22} (reference {' | '.join(r)!r})")


def report(when: str, cfg: Config, built: Built, ds: datasets.Dataset, objective: ModuleType,
           state, trackers: Trackers | None = None, step: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """`scores` before or after training, printed with a few answers (and sent to `trackers`, as at
    `step`) and the objective's line; returns (the scores, as the loop logs them; metrics.json's
    `<name>_<when>` entries)."""
    answers = evaluate(cfg, built, ds)
    show(when, answers)
    if trackers is not None:
        trackers.samples(step, answers)
    figures = scores(cfg, built, ds, objective, state, answers)
    return figures, {f"{cfg.data.metric}_{when}": answers["score"], **objective.report(when, figures)}


def save_metrics(output_dir: str | Path, metrics: dict) -> Path:
    """<output_dir>/metrics.json: the run's figures, replaced whole (never half written)."""
    path = Path(output_dir) / "metrics.json"
    write_atomic(path, json.dumps(metrics, indent=2).encode())
    return path
