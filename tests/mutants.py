"""`make mutants`: break the core one small way at a time, and see whether the tests notice.

Each mutant below is one edit a careless change could make: a sign, a comparison, a missing
line, a default. For each, a copy of the working tree gets that edit alone and the tests named
with it run (pytest -x: until the first failure). Failing tests kill the mutant; if they all
pass, it survived, and either a test is missing or the mutant changes nothing that can be
observed: each survivor on the list says which, in `why`. At the end: the kill rate, and the
survivors with their reasons. Exit status 1 if a survivor has no reason.

    python tests/mutants.py                      # all of them (about 15 minutes on 2 cores)
    python tests/mutants.py --only loop.climbs   # one or a few, by name
    python tests/mutants.py --list               # names and edits; checks every edit still applies

Run it before a restructuring and after (it is not part of CI): a test that stops killing its
mutant has stopped guarding what it was written for. `make test` must pass first, or a failing
test would count as a kill. When the code moves, an edit that no longer matches, or a test name
that no longer exists, is reported before anything runs: update the list here.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, the likeliest killer first
    why: str = ""  # for a mutant known to survive: why no test can or need catch it


def m(name: str, file: str, old: str, new: str, *tests: str, why: str = "") -> Mutant:
    return Mutant(name, file, old, new, tuple(f"tests/{t}" for t in tests), why)


LORA, QUANT, LOOP, OPTIM, CKPT, SFT, DPO, METRICS = (f"minivlm/{f}.py" for f in (
    "lora", "quant", "loop", "optim", "checkpoint", "objectives/sft", "objectives/dpo", "metrics"))

TRACKED = "test_every_tracker_gets_the_log_the_samples_and_the_end_and_a_resume_continues_its_run"

MUTANTS = [
    # LoRA: the adapter's math, its dropout, merge, what is frozen and trained.
    m("lora.scale", LORA, "if rslora else alpha / r  #", "if rslora else alpha / r / 2  #", "test_lora.py"),
    m("lora.b-not-zero", LORA, "self.lora_B = nn.Parameter(torch.zeros(", "self.lora_B = nn.Parameter(torch.randn(",
      "test_lora.py"),
    m("lora.no-dropout", LORA, "a, b, h = (self.lora_A, self.lora_B, self.dropout(x))",
      "a, b, h = (self.lora_A, self.lora_B, x)", "test_lora.py"),
    m("lora.shared-dropout-in-eval", LORA, "if not self.training:\n            self._last = None",
      "if False:\n            self._last = None", "test_lora.py"),
    m("lora.merge-unscaled", LORA, "return (self.lora_B @ self.lora_A) * self.scaling", "return self.lora_B @ self.lora_A",
      "test_lora.py"),
    m("lora.shared-dropout-mask-per-layer", LORA, "if self._last is not None and self._last[0]() is x:", "if False:",
      "test_lora.py"),
    m("lora.merge-sign", LORA, "w.copy_((w.float() + self.delta_weight())", "w.copy_((w.float() - self.delta_weight())",
      "test_lora.py"),
    m("lora.unmerge-stays-merged", LORA, "w.copy_((w.float() - self.delta_weight()).to(w.dtype))\n        self.merged = False",
      "w.copy_((w.float() - self.delta_weight()).to(w.dtype))", "test_lora.py"),
    m("lora.adapters-stay-off", LORA, "            m.enabled = True", "            m.enabled = False",
      "test_dpo.py::test_adapters_off_is_the_base_model_and_step_zero_is_log_2"),
    m("lora.skip-ignored", LORA,
      "elif targeted and not skipped:", "elif targeted:", "test_quant.py::test_paligemma_scope",
      "test_lora.py"),
    m("lora.base-not-frozen", LORA, "model.requires_grad_(False)", "model.requires_grad_(True)",
      "test_quant.py::test_paligemma_scope", "test_lora.py"),
    m("lora.train-modules-not-fp32", LORA, "module.float().requires_grad_(True)", "module.requires_grad_(True)",
      "test_lora.py"),

    # Quantization: the scope and the format.
    m("quant.skip-ignored", QUANT,
      "if type(m) is nn.Linear and not any(matches(name, s, anywhere=True) for s in skip)", "if type(m) is nn.Linear",
      "test_quant.py"),
    m("quant.mha-out-proj-quantized", QUANT, "if type(m) is nn.Linear and", "if isinstance(m, nn.Linear) and",
      "test_quant.py"),
    m("quant.default-fp4", "minivlm/config.py", 'quant_type: str = "nf4"', 'quant_type: str = "fp4"', "test_quant.py"),
    m("quant.default-no-double-quant", "minivlm/config.py", "double_quant: bool = True", "double_quant: bool = False",
      "test_quant.py"),
    m("quant.compute-dtype-fp32", QUANT, "compute_dtype=compute_dtype, compress_statistics",
      "compute_dtype=torch.float32, compress_statistics", "test_quant.py::test_4bit_layers_compute_in_the_model_dtype"),
    m("quant.cpu-repack-on", QUANT, "q.support_avx512bf16_for_cpu = False", "q.support_avx512bf16_for_cpu = True",
      "test_quant.py::test_train_eval_train_on_4bit"),

    # The loop: the loss, its normalisation, the step, evaluation, saving, the run's length.
    m("sft.climbs", SFT, "scaler.scale(loss).backward()", "scaler.scale(-loss).backward()",
      "test_loop.py::test_training_lowers_the_loss_and_teaches_the_answer",
      "test_loop.py::test_batch4_accum1_equals_batch1_accum4"),
    m("sft.mean-of-means", SFT, "loss = answer_loss_sum(cfg, built, batch, model) / n_tokens",
      "loss = answer_loss_sum(cfg, built, batch, model) / answer_tokens(batch) / len(batches)",
      "test_loop.py::test_batch4_accum1_equals_batch1_accum4"),
    m("sft.mean-not-sum", SFT, 'answer_targets(batch), model).sum()', 'answer_targets(batch), model).mean()',
      "test_loop.py::test_batch4_accum1_equals_batch1_accum4"),
    m("loop.no-clipping", LOOP,
      'grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf")))',
      "grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable]))",
      "test_loop.py::test_the_optimizer_steps_with_the_clipped_gradient_and_the_scheduled_lr"),
    m("loop.clips-scaled-fp16-gradients", LOOP, "run.scaler.unscale_(run.optimizer)  # clip", "pass  # clip",
      "test_loop.py::test_fp16_clips_and_logs_the_unscaled_gradient"),
    m("loop.lr-one-step-ahead", LOOP, "lr = lr_at(step, total, t)", "lr = lr_at(step + 1, total, t)",
      "test_loop.py::test_the_optimizer_steps_with_the_clipped_gradient_and_the_scheduled_lr"),
    m("loop.lr-unscheduled", LOOP, 'group["lr"] = lr *', 'group["lr"] = 2e-4 *',
      "test_loop.py::test_the_optimizer_steps_with_the_clipped_gradient_and_the_scheduled_lr"),
    m("loop.gradients-kept-across-steps", LOOP, "        self.scaler.update()\n        self.optimizer.zero_grad(set_to_none=True)\n",
      "        self.scaler.update()\n", "test_loop.py::test_training_lowers_the_loss_and_teaches_the_answer",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("steps.epochs-ignored", "minivlm/steps.py", "grad_accum) * t.epochs", "grad_accum)",
      "test_loop.py::test_the_optimizer_steps_with_the_clipped_gradient_and_the_scheduled_lr"),
    m("sft.val-loss-with-dropout", SFT, "built.model.eval()  # dropout off", "built.model.train()  # dropout off",
      "test_loop.py::test_validation_loss_reads_every_row_of_a_long_split"),
    m("sft.eval-mode-after-validation", SFT, "    built.model.train(was_training)\n    total, tokens = distributed.totals",
      "    total, tokens = distributed.totals", "test_loop.py::test_validation_loss_reads_every_row_of_a_long_split"),
    m("loop.tie-is-best", LOOP, 'if score > run.state["best_score"]:', 'if score >= run.state["best_score"]:',
      "test_llava_phi2.py::test_early_stopping_keeps_the_best",
      "test_checkpoint.py::test_a_crash_at_any_filesystem_step_of_any_save_loses_nothing"),
    m("loop.patience-plus-one", LOOP, 'run.state["evals_since_best"] >= t.early_stopping_patience',
      'run.state["evals_since_best"] > t.early_stopping_patience', "test_llava_phi2.py::test_early_stopping_keeps_the_best"),
    m("loop.save-every-off-by-one", LOOP, "run.step % t.save_every == 0", "step % t.save_every == 0",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("loop.nan-step-taken", LOOP,
      "if math.isfinite(loss) and (t.fp16 or math.isfinite(grad_norm)):", "if True:",
      "test_resume_checks.py::test_nonfinite_loss_skips_steps_then_stops_saving_nothing"),
    m("sft.tokens-counted-per-rank", SFT,
      "n_tokens = int(distributed.total(sum(answer_tokens(b) for b in batches), built.device))",
      "n_tokens = sum(answer_tokens(b) for b in batches)",
      "test_distributed.py::test_two_ranks_train_as_one_process_on_the_combined_batch"),

    # The optimizer and the schedule.
    m("optim.no-weight-decay", OPTIM, "weight_decay=cfg.weight_decay", "weight_decay=0.0",
      "test_loop.py::test_weight_decay_and_betas_reach_the_optimizer"),
    m("optim.default-betas", OPTIM, "betas=tuple(cfg.betas)", "betas=(0.9, 0.999)",
      "test_loop.py::test_weight_decay_and_betas_reach_the_optimizer"),
    m("optim.adamw-is-8bit", OPTIM, 'if cfg.optimizer == "adamw":', 'if cfg.optimizer == "adamw32":',
      "test_loop.py::test_weight_decay_and_betas_reach_the_optimizer"),
    m("optim.warmup-starts-at-0", OPTIM, "cfg.lr * (step + 1) / (cfg.warmup_steps + 1)", "cfg.lr * step / cfg.warmup_steps",
      "test_loop.py::test_lr_schedule_warmup_then_decay"),
    m("optim.cosine-doubled", OPTIM, "cfg.lr * 0.5 * (1 + math.cos", "cfg.lr * (1 + math.cos",
      "test_loop.py::test_lr_schedule_warmup_then_decay"),
    m("optim.linear-rises", OPTIM, "return cfg.lr * (1 - progress)", "return cfg.lr * progress",
      "test_loop.py::test_lr_schedule_warmup_then_decay"),

    # Checkpoints: what is saved and restored, and the order that makes a crash harmless.
    m("checkpoint.prune-before-rename", CKPT,
      "    _replace(tmp, final)\n\n    _point(out / \"last\", final)\n    if best:\n        _point(out / \"best\", final)\n"
      "    _prune(out, [d for d, _ in earlier] + [final], keep)\n",
      "    _prune(out, [d for d, _ in earlier] + [final], keep)\n    _replace(tmp, final)\n\n"
      "    _point(out / \"last\", final)\n    if best:\n        _point(out / \"best\", final)\n",
      "test_checkpoint.py::test_a_crash_at_any_filesystem_step_of_any_save_loses_nothing"),
    m("loop.resume-starts-over", LOOP, "        if resume:\n            load_adapter(resume, model)",
      "        if False:\n            load_adapter(resume, model)",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("checkpoint.no-rng", CKPT, '    set_rng_state(state["rng"])\n', "", "test_checkpoint.py::test_training_state_round_trips",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("checkpoint.no-optimizer-state", CKPT, 'optimizer.load_state_dict(state["optimizer"])', "pass",
      "test_checkpoint.py::test_training_state_round_trips", "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("checkpoint.no-scaler-state", CKPT, 'scaler.load_state_dict(state["scaler"])', "pass",
      "test_checkpoint.py::test_training_state_round_trips", "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("checkpoint.adapter-not-loaded", CKPT, "params[name].copy_(saved[name])", "pass",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("checkpoint.newest-by-step", CKPT, 'key=lambda dm: (dm[1].get("saved", 0), dm[1]["step"], dm[0].name)',
      'key=lambda dm: (dm[1]["step"], dm[0].name)', "test_checkpoint.py::test_resuming_an_older_save_keeps_it_and_its_own_best"),
    m("checkpoint.leftovers-kept", CKPT,
      'for leftover in [*root.glob("*.tmp"), *root.glob("*.del"), out / "last.tmp", out / "best.tmp"]:',
      "for leftover in []:", "test_checkpoint.py"),
    m("checkpoint.best-pruned", CKPT, 'spared = {p.resolve() for p in (out / "best", protect)',
      'spared = {p.resolve() for p in (protect,)', "test_checkpoint.py"),
    m("checkpoint.no-fsync", CKPT, "        os.fsync(f.fileno())\n", "",
      "test_checkpoint.py::test_a_crash_at_any_filesystem_step_of_any_save_loses_nothing",
      why="fsync only matters when the kernel's page cache is lost (a power cut); a test process can be killed "
          "but not the machine it runs on"),
    m("config.resume-conflicts-ignored", "minivlm/config.py", 'if f"{section}.{key}" not in free and old != new:', "if False:",
      "test_resume_checks.py::test_resume_refuses_a_config_that_changes_the_math_listing_each_key"),

    # DPO: the loss, its reference, its averaging.
    m("dpo.sign", DPO, "margin = chosen_rewards - rejected_rewards", "margin = rejected_rewards - chosen_rewards",
      "test_dpo.py::test_loss_equals_trls_on_the_same_log_probabilities"),
    m("dpo.reference-with-dropout", "minivlm/objectives/reference.py", "    was_training = model.training\n    model.eval()\n",
      "    was_training = model.training\n", "test_dpo.py::test_the_reference_and_held_out_pairs_are_dropout_free"),
    m("dpo.held-out-with-dropout", DPO, "    built.model.eval()  # dropout off\n", "",
      "test_dpo.py::test_the_reference_and_held_out_pairs_are_dropout_free"),
    m("dpo.smoothing-sign", DPO, "- label_smoothing * F.logsigmoid(-margin)", "+ label_smoothing * F.logsigmoid(-margin)",
      "test_dpo.py::test_loss_equals_trls_on_the_same_log_probabilities"),
    m("dpo.no-beta-on-chosen", DPO, "chosen_rewards = beta * (chosen_logps", "chosen_rewards = (chosen_logps",
      "test_dpo.py::test_loss_equals_trls_on_the_same_log_probabilities"),
    m("dpo.mean-of-micro-batch-means", DPO, "scaler.scale(losses.sum() / n_pairs).backward()",
      "scaler.scale(losses.mean() / len(batches)).backward()", "test_dpo.py::test_loss_and_gradient_equal_the_formula"),
    m("dpo.trained-weights-not-restored", "minivlm/objectives/reference.py", "                    for n, w in trained.items():\n"
      "                        params[n].copy_(w)\n", "                    pass\n",
      "test_dpo.py::test_init_from_an_sft_adapter_makes_it_the_frozen_reference"),

    # Metrics.
    m("metrics.accuracy-unnormalised", METRICS, "normalize(p) in {normalize(r) for r in refs}", "p in set(refs)",
      "test_metrics.py"),
    m("metrics.vqa-four-humans", METRICS, "if j != i) / 3)", "if j != i) / 4)", "test_metrics.py"),
    m("metrics.vqa-not-leave-one-out", METRICS, "sum(g == pred for j, g in enumerate(gts) if j != i)",
      "sum(g == pred for g in gts)", "test_metrics.py"),
    m("metrics.vqa-articles-kept", METRICS, "for w in words if w not in _ARTICLES]", "for w in words]", "test_metrics.py"),
    m("metrics.vqa-number-words-kept", METRICS, "words = [_NUMBERS.get(w, w) for w", "words = [w for w", "test_metrics.py"),
    m("metrics.anls-threshold-inclusive", METRICS, "1 - ratio if ratio < threshold", "1 - ratio if ratio <= threshold",
      "test_metrics.py"),
    m("metrics.relaxed-boundary-exclusive", METRICS, "abs(p - a) / abs(a) <= tolerance", "abs(p - a) / abs(a) < tolerance",
      "test_metrics.py"),
    m("metrics.bleu-brevity-inverted", METRICS, "math.exp(1 - r / c)", "math.exp(1 - c / r)", "test_metrics.py"),
    m("metrics.bleu-unclipped", METRICS, "sum(min(k, most[g]) for g, k in counts.items())", "sum(counts.values())",
      "test_metrics.py"),
    m("metrics.cider-sigma", METRICS, "(2 * sigma ** 2)", "(sigma ** 2)", "test_metrics.py"),

    # Evaluation.
    m("evaluate.generates-with-dropout", "minivlm/evaluate.py", "    model.eval()\n    inputs = model_inputs(", "    model.train()\n    inputs = model_inputs(",
      "test_evaluate.py"),

    # Data: which tokens carry the loss, and which samples are kept.
    m("batches.answer-positions-shifted", "minivlm/batches.py", "(0, 1), value=False)", "(1, 0), value=False)",
      "test_loop.py::test_lm_head_runs_only_at_answer_positions_with_the_full_logits_loss"),
    m("batches.max-length-exclusive", "minivlm/batches.py", "keep = (lengths <= cfg.max_length)",
      "keep = (lengths < cfg.max_length)", "test_paligemma.py", "test_families.py::test_too_long_sample_is_dropped_not_cut"),
    m("batches.dropped-rows-not-reprocessed", "minivlm/batches.py", "    rows = keep.repeat(rows_per_sample).tolist()\n",
      "    return batch\n", "test_architectures.py::test_a_sample_too_long_for_max_length_is_dropped_whole_and_named",
      "test_paligemma.py"),

    # Resolution: model.processor reaches the processor and the planner.
    m("processor.resolution-ignored", "minivlm/models/processor.py",
      "    image_processor = AutoImageProcessor.from_pretrained(name_or_path, **resolution)",
      "    image_processor = AutoImageProcessor.from_pretrained(name_or_path)",
      "test_architectures.py::test_the_resolution_keys_reach_the_processor"),
    m("processor.call-time-defaults-win", "minivlm/models/processor.py",
      "processor.images_kwargs = {**defaults, **{k: v for k, v in resolution.items() if k in defaults}}",
      "processor.images_kwargs = dict(defaults)", "test_architectures.py::test_the_resolution_keys_reach_the_processor"),
    m("plan.resolution-keys-ignored", "minivlm/plan.py", "family.layout(model, {**preprocessor, **cfg.model.processor})",
      "family.layout(model, preprocessor)",
      "test_architectures.py::test_planned_activations_match_what_autograd_saves_at_two_resolutions"),
    m("qwen.tokens-per-patch-not-merged", "minivlm/models/qwen2_5_vl.py",
      "side = vision.patch_size * vision.spatial_merge_size", "side = vision.patch_size",
      "test_architectures.py::test_planned_activations_match_what_autograd_saves_at_two_resolutions"),
    m("build.model-ignores-shared-resolution", "minivlm/build.py", "storage, shared)", "storage)",
      "test_architectures.py::test_planned_activations_match_what_autograd_saves_at_two_resolutions"),
    m("onevision.crop-cap-ignored", "minivlm/models/llava_onevision.py", "if ratio > 1.1:", "if ratio > 1e9:",
      "test_architectures.py::test_planned_activations_match_what_autograd_saves_at_two_resolutions"),
    m("plan.call-time-defaults-ignored", "minivlm/models/processor.py",
      "return {**saved, **defaults}", "return saved",
      "test_architectures.py::test_the_plan_counts_what_the_processor_does_at_call_time"),
    m("plan.cross-attention-keys-ignored", "minivlm/plan.py",
      "+ layout.vision_state_readers * cross_kv)", "+ 0 * cross_kv)", "test_architectures.py::test_planned_activations_match_what_autograd_saves_at_two_resolutions"),
    m("finish.last-not-repointed", CKPT, 'if saves and _point(out / "last", saves[-1]):', "if False:",
      "test_resume_checks.py::test_resume_completes_the_end_a_crash_cut_short_and_says_what"),
    m("finish.before-measured-on-every-resume", "minivlm/finish.py", "if not fresh and path.is_file():", "if False:",
      "test_resume_checks.py::test_resume_completes_the_end_a_crash_cut_short_and_says_what"),
    m("finish.end-never-completed", "minivlm/cli/train.py", "return complete(cfg, args, resume, meta, steps, eval_ds, objective)",
      'return {"steps": meta["step"], "nothing_to_do": True}',
      "test_resume_checks.py::test_resume_completes_the_end_a_crash_cut_short_and_says_what"),
    m("data.exif-ignored", "minivlm/data.py", "if image.getexif().get(ORIENTATION, 1) != 1:", "if False:",
      "test_data.py::test_to_rgb_turns_photos_upright_and_reads_animations_and_cmyk"),
    m("steps.same-order-every-epoch", "minivlm/steps.py", "manual_seed(seed * 100_003 + epoch)", "manual_seed(seed * 100_003)",
      "test_data.py::test_epoch_batches_cover_every_sample_once_and_reshuffle"),
    m("steps.stream-same-order-every-epoch", "minivlm/steps.py", "            self.stream.set_epoch(epoch)", "            pass",
      "test_data.py::test_a_stream_is_read_epoch_after_epoch_reshuffled_and_resumes_where_it_was"),
    m("steps.stream-resumes-at-epoch-start", "minivlm/steps.py", "itertools.islice(rows, row, None)",
      "itertools.islice(rows, 0, None)",
      "test_data.py::test_a_stream_is_read_epoch_after_epoch_reshuffled_and_resumes_where_it_was"),
    m("steps.stream-workers-duplicate", "minivlm/steps.py", "mine = (step - self.first) % workers == worker",
      "mine = True", "test_data.py::test_a_stream_is_read_epoch_after_epoch_reshuffled_and_resumes_where_it_was"),
    m("loop.stream-position-not-restored", "minivlm/loop.py", 'resume_at=run.state.get("stream"), repeat=',
      "resume_at=None, repeat=",
      "test_loop.py::test_resume_n_plus_n_equals_2n"),
    m("steps.ranks-take-all", "minivlm/steps.py",
      "mine = [idx[parts.rank * parts.batch_size:(parts.rank + 1) * parts.batch_size] for idx in window]",
      "mine = window", "test_distributed.py::test_two_ranks_train_as_one_process_on_the_combined_batch"),
    m("grpo.unclipped", "minivlm/objectives/grpo.py", "per_token = -torch.min(ratio * a, clipped * a)",
      "per_token = -ratio * a", "test_grpo.py::test_loss_and_gradient_equal_the_formula_on_full_logits"),
    m("grpo.kl-sign", "minivlm/objectives/grpo.py", "kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1",
      "kl = torch.exp(logp - ref_logp) - (logp - ref_logp) - 1",
      "test_grpo.py::test_loss_and_gradient_equal_the_formula_on_full_logits"),
    m("grpo.dapo-per-sequence", "minivlm/objectives/grpo.py", 'return int(mask.sum()) if loss_type == "dapo" else len(mask)',
      "return len(mask)", "test_grpo.py::test_loss_and_gradient_equal_the_formula_on_full_logits"),
    m("grpo.window-not-checkpointed", "minivlm/objectives/grpo.py", "        if not self.left:\n", "        if True:\n",
      "test_grpo.py::test_a_resumed_run_samples_and_trains_what_the_unbroken_one_did"),
    m("grpo.iterations-ignored", "minivlm/objectives/grpo.py", "for b in batches], g.iterations", "for b in batches], 1",
      "test_grpo.py::test_a_resumed_run_samples_and_trains_what_the_unbroken_one_did"),
    m("steps.window-not-repeated", "minivlm/steps.py", "        if again:\n", "        if False:\n",
      "test_grpo.py::test_a_resumed_run_samples_and_trains_what_the_unbroken_one_did"),
    m("grpo.count-per-rank", "minivlm/objectives/grpo.py",
      "count = int(distributed.total(sum(divisor(r.mask, g.loss_type) for r in rollouts if r), built.device))",
      "count = int(sum(divisor(r.mask, g.loss_type) for r in rollouts if r))",
      "test_distributed.py::test_two_ranks_train_as_one_process_on_the_combined_batch"),
    m("grpo.old-is-new", "minivlm/objectives/grpo.py", "old = r.old_logp if r.old_logp is not None else logp.detach()",
      "old = logp.detach()", "test_grpo.py::test_one_update_per_sample_never_clips_and_the_kl_starts_at_zero"),
    m("plan.sampling-keys-only", "minivlm/plan.py", "plan.sampling = tokens * tc.num_hidden_layers * 2 * e * kv",
      "plan.sampling = tokens * tc.num_hidden_layers * e * kv",
      "test_grpo.py::test_the_plan_counts_the_sampling_kv_cache_as_generate_holds_it"),
    m("rewards.configured-weights-ignored", "minivlm/rewards.py", "return Rewards(functions, g.reward_weights or None)",
      "return Rewards(functions)", "test_rewards.py::test_the_configured_rewards_are_built_by_name_and_weighted"),
    m("grpo.advantages-unscaled", "minivlm/objectives/grpo.py", "    if scale:\n", "    if False:\n",
      "test_grpo.py::test_advantages_are_the_reward_against_its_group_and_zero_where_all_agree"),
    m("grpo.completion-typed-as-prompt", "minivlm/objectives/grpo.py", "torch.full_like(completion, value)",
      "torch.full_like(completion, 0)", "test_grpo.py::test_sampled_completions_are_scored_token_for_token"),
    m("grpo.end-token-unlabelled", "minivlm/objectives/grpo.py", "return completion, (is_end.cumsum(1) - is_end.long()) == 0",
      "return completion, is_end.cumsum(1) == 0", "test_grpo.py::test_sampled_completions_are_scored_token_for_token"),
    m("rewards.format-searches", "minivlm/rewards.py", "compiled.fullmatch(c.strip())", "compiled.search(c.strip())",
      "test_rewards.py::test_format_matches_the_whole_completion"),
    m("rewards.nan-accepted", "minivlm/rewards.py", "            if not math.isfinite(number):",
      "            if number is None:", "test_rewards.py::test_a_failing_reward_is_one_message_naming_it_and_the_row"),
    m("rewards.weights-ignored", "minivlm/rewards.py", "sum(w * torch.tensor(each[name]", "sum(1 * torch.tensor(each[name]",
      "test_rewards.py::test_rewards_combine_with_weights_and_keep_each"),
    m("paligemma.prompt-labelled", "minivlm/models/paligemma.py", 'batch["token_type_ids"] == 0', 'batch["attention_mask"] == 0',
      "test_paligemma.py"),
    m("chat.end-token-unlabelled", "minivlm/models/chat.py", "span = span[: ends[-1].item() + 1]",
      "span = span[: ends[-1].item()]", "test_families.py::test_labels_are_the_assistant_answer_and_end_of_turn"),
    # Several images: where they go, how answers are found among their tokens, what the batches keep.
    m("chat.answer-without-header", "minivlm/models/chat.py", "    context = len(_ids(tokenizer, header))",
      "    context = 0", "test_chat.py::test_an_answer_the_question_ends_with_is_labelled_in_the_answer_not_the_question"),
    m("chat.search-from-start", "minivlm/models/chat.py", "found = _find(ids, needle, searched)",
      "found = _find(ids, needle, 0)", "test_chat.py"),
    m("chat.unmarked-images-in-last-turn", "minivlm/models/chat.py", "else [media] + [0] * (len(dialog) - 1)",
      "else [0] * (len(dialog) - 1) + [media]", "test_chat.py"),
    m("data.markers-unchecked", "minivlm/data.py", "    if marked and marked != kinds:",
      "    if False:", "test_data.py::test_markers_must_match_the_images"),
    m("data.second-image-dropped", "minivlm/data.py", "    values = value if isinstance(value, list) else [value]",
      "    values = value[:1] if isinstance(value, list) else [value]", "test_data.py::test_a_corrupt_second_image_skips_its_row_counted"),
    m("batches.max-images-ignored", "minivlm/batches.py", "if images_in(media) > cfg.max_images]", "if False]",
      "test_data.py::test_more_images_than_max_images_drop_the_sample_with_the_key_to_raise"),
    m("batches.one-crop-per-sample", "minivlm/batches.py",
      "else crop(m) for m in media], dialog)",
      "else crop(m) for m in media[:1]] + media[1:], dialog)",
      "test_data.py::test_each_image_of_a_sample_is_cropped_by_the_same_policy"),
    m("plan.one-image-a-sample", "minivlm/models/__init__.py", "    if images == 1:\n        return layout",
      "    if True:\n        return layout", "test_architectures.py::test_the_plan_counts_data_max_images_images_per_sample"),
    m("video.frames-not-paired", "minivlm/models/qwen2_5_vl.py", ".permute(0, 2, 3, 1, 4, 5)", ".permute(0, 2, 1, 3, 4, 5)",
      "test_video.py::test_qwen_video_frames_are_laid_out_as_transformers_video_processor_lays_them"),
    m("video.first-frames-not-spread", "minivlm/data.py", "    return [int(i * total / n) for i in range(n)]",
      "    return list(range(n))", "test_video.py::test_frames_are_sampled_as_configured_from_a_file_and_from_a_list"),
    m("video.rate-not-resampled", "minivlm/data.py",
      "    return Video([frames[i] for i in picked], (rate or DEFAULT_FPS) * len(picked) / len(frames))",
      "    return Video([frames[i] for i in picked], rate or DEFAULT_FPS)",
      "test_video.py::test_frames_are_sampled_as_configured_from_a_file_and_from_a_list"),
    m("video.counted-as-image", "minivlm/models/chat.py", '    return "video" if isinstance(item, Video) else "image"',
      '    return "image"', "test_video.py::test_an_unmarked_video_goes_where_the_rows_media_put_it_and_markers_must_match_kinds"),
    m("video.qwen3-bound-per-frame", "minivlm/models/qwen3_vl.py",
      "        h, w = smart_resize(max(len(frames), self.temporal_patch_size), height, width,",
      "        h, w = smart_resize(self.temporal_patch_size, height, width,",
      "test_video.py::test_qwen3_bounds_the_clip_not_each_frame"),
    m("video.qwen3-plan-per-frame-count", "minivlm/models/qwen3_vl.py",
      "most // min(n, round(n / 2) * 2) //", "most // n //",
      "test_video.py::test_the_plan_counts_the_video_tokens_the_processor_makes"),
    m("video.short-video-black-frames", "minivlm/models/processor.py",
      "list(frames[-1:]) * (most - len(frames))", "[Image.new('RGB', frames[0].size)] * (most - len(frames))",
      "test_video.py::test_smolvlm2_holds_a_short_videos_last_frame_and_refuses_images_beside_video"),
    m("video.frame-mean-of-images-ignored", "minivlm/models/processor.py",
      'saved.get("image_mean", ip.image_mean)', '[0.0, 0.0, 0.0]',
      "test_video.py::test_onevision_frames_are_the_image_processors_whole_view"),
    m("video.smolvlm2-mixes-images", "minivlm/batches.py",
      'if not getattr(family, "VIDEO_BESIDE_IMAGES", True)', "if False",
      "test_video.py::test_smolvlm2_holds_a_short_videos_last_frame_and_refuses_images_beside_video"),
    m("video.onevision-newline-uncounted", "minivlm/models/llava_onevision.py",
      "    tokens = frames * pooled + 1", "    tokens = frames * pooled",
      "test_video.py::test_the_plan_counts_the_video_tokens_the_processor_makes"),
    m("lora.rslora-as-lora", LORA, "alpha / math.sqrt(r) if rslora else alpha / r", "alpha / r",
      "test_lora.py::test_rslora_scales_by_alpha_over_sqrt_r_and_merges_the_same"),
    m("optim.lora-plus-off", OPTIM, '"lr_scale": cfg.lora_plus_ratio}', '"lr_scale": 1.0}',
      "test_loop.py::test_lora_plus_steps_every_b_at_ratio_times_lr_in_the_groups_peft_makes"),
    m("loop.lora-plus-unscaled", LOOP, 'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = lr',
      "test_loop.py::test_lora_plus_steps_every_b_at_ratio_times_lr_in_the_groups_peft_makes"),
    m("export.rslora-unwritten", "minivlm/export.py", '"use_rslora": cfg.lora.use_rslora', '"use_rslora": False',
      "test_export.py::test_peft_loads_an_rslora_adapter_with_the_same_logits"),
    # DoRA, the starts taken from W, LoRA on the vision tower (issue 24).
    m("lora.dora-norm-in-autograd", LORA, "    @torch.no_grad()\n    def weight_norm", "    def weight_norm",
      "test_lora.py::test_variants_equal_peft_on_a_transformers_model"),
    m("lora.dora-magnitude-frozen", LORA, "scale = self.lora_magnitude / self.weight_norm()",
      "scale = self.lora_magnitude.detach() / self.weight_norm()",
      "test_lora.py::test_dora_is_magnitude_times_the_normalised_adapted_weight"),
    m("lora.dora-bias-scaled", LORA, "            base_h = base_h - self.base.bias", "            base_h = base_h",
      "test_lora.py::test_dora_is_magnitude_times_the_normalised_adapted_weight"),
    m("lora.dora-base-undropped", LORA, "base_h = self.base(h) if dropped else y", "base_h = y",
      "test_lora.py::test_variants_equal_peft_on_a_transformers_model"),
    m("lora.dora-merge-without-m", LORA,
      "w.copy_(((self.lora_magnitude / self._merged_norm)[:, None] * w.float()).to(w.dtype))", "pass",
      "test_lora.py::test_merge_equals_unmerged_and_unmerge_restores"),
    m("lora.adapters-off-forgets-the-start", LORA, "if self.merged or not self.enabled and self.lora_A0 is None:",
      "if self.merged or not self.enabled:", "test_lora_init.py::test_the_model_before_training_is_the_base"),
    m("lora.vision-off", LORA, "if vision and matches(name, vision, anywhere=True)", "if False",
      "test_lora.py::test_lora_vision_adapts_every_linear_of_the_tower_blocks_and_nothing_else"),
    m("lora_init.pissa-unscaled", "minivlm/lora_init.py", "root = torch.sqrt(sv[:r] / scaling)",
      "root = torch.sqrt(sv[:r])", "test_lora_init.py::test_init_equals_peft"),
    m("lora_init.residual-kept-whole", "minivlm/lora_init.py", "            frozen = w - layer.scaling * b @ a",
      "            frozen = w", "test_lora_init.py::test_the_model_before_training_is_the_base"),
    m("lora_init.loftq-one-pass", "minivlm/lora_init.py", "            frozen = w - scaling * b @ a",
      "            frozen = w", "test_lora_init.py::test_loftq_error_falls_with_iterations_and_beats_plain_qlora"),
    m("lora_init.fp32-svd", "minivlm/lora_init.py", "torch.linalg.svd(w.double(), full_matrices=False)",
      "torch.linalg.svd(w, full_matrices=False)", "test_lora_init.py::test_the_start_is_the_same_bits_at_any_thread_count",
      "test_distributed.py::test_two_ranks_train_as_one_process_on_the_combined_batch"),
    m("export.pissa-unconverted", "minivlm/export.py", '    if cfg.lora.init != "default":\n', "    if False:\n",
      "test_export.py::test_peft_loads_a_pissa_or_olora_adapter_on_the_original_base"),
    m("export.dora-magnitude-misnamed", "minivlm/export.py", 'return f"base_model.model.{name}_vector"',
      'return f"base_model.model.{name}"', "test_export.py::test_peft_loads_a_dora_adapter_with_the_same_logits"),
    m("plan.dora-activations-uncounted", "minivlm/plan.py", "lora += 2 * e * sum(outputs[:n])", "lora += 0",
      "test_plan.py::test_planned_activations_match_what_autograd_saves"),
    m("grpo.scoring-interleaved", "minivlm/objectives/grpo.py",
      "    expanded = {key: torch.cat([value] * group) for key, value in inputs.items()}",
      "    expanded = {key: value.repeat_interleave(group, 0) for key, value in inputs.items()}",
      "test_grpo.py::test_two_image_prompts_are_sampled_once_and_scored_token_for_token"),
    # Trackers and the package.
    *(m(f"trackers.{name}", "minivlm/trackers.py", old, new, f"test_trackers.py::{TRACKED}") for name, old, new in [
        ("stale-steps-kept", "purge_step=None if resumed_at is None else resumed_at + 1", "purge_step=None"),
        ("trackio-run-not-reopened", 'resume="never" if resumed_at is None else "allow"', 'resume="never"'),
        ("run-ids-forgotten", "if resumed_at is not None and path.is_file() else {}", "if False else {}")]),
    m("trackers.no-samples-at-evaluations", LOOP, "    run.trackers.samples(run.step, answers)\n", "",
      f"test_trackers.py::{TRACKED}"),
    m("trackers.no-end", "minivlm/cli/train.py", '        tracked.end(result["step"], cfg.train.output_dir)\n', "",
      f"test_trackers.py::{TRACKED}"),
    m("build.no-probe", "minivlm/build.py", "            constants.HF_HUB_OFFLINE = True  # read",
      "            pass  # read", "test_offline.py::test_training_on_an_uncached_hub_id_fails_after_one_try"),
    m("plan.no-copy-in-configs-real", "minivlm/plan.py", "    if not copy.is_dir():\n", "    if True:\n",
      "test_offline.py::test_dry_run_of_a_seed_recipe_plans_from_its_copy_in_configs_real_without_the_network",
      "test_plan.py::test_every_recipe_of_a_hub_model_plans_from_its_copy_in_configs_real"),
    m("logprobs.softcap-dropped", "minivlm/logprobs.py", "    if softcap:\n", "    if False:\n",
      "test_logprobs.py::test_a_softcapped_model_is_capped_in_the_chunks_too"),
    m("logprobs.chunks-overlap", "minivlm/logprobs.py", "tap.hidden[i:i + chunk], targets[i:i + chunk]",
      "tap.hidden[i:i + chunk], targets[i + 1:i + 1 + chunk]",
      "test_logprobs.py::test_chunks_give_the_full_logits_values_and_gradients"),
    m("logprobs.kept-not-recomputed", "minivlm/logprobs.py", "        chunks = [checkpoint(chunk_log_probs, head,",
      "        chunks = [(lambda f, *a, **k: f(*a))(chunk_log_probs, head,",
      "test_logprobs.py::test_no_more_than_a_chunk_of_vocabulary_rows_exists_and_none_is_kept"),
    m("logprobs.lm-head-not-restored", "minivlm/logprobs.py", "        replace_module(model, name, head)\n",
      "        pass\n", "test_logprobs.py::test_chunks_give_the_full_logits_values_and_gradients"),
    m("package.exit-with-figures", "pyproject.toml", 'minivlm-train = "minivlm.cli:train_command"',
      'minivlm-train = "minivlm.cli.train:main"',
      "test_package.py::test_pip_install_puts_the_commands_on_the_path_and_they_train_outside_the_repository"),
    m("packing.positions-not-restarted", "minivlm/packing.py", "    counted = keep.long().cumsum(1) - 1",
      "    counted = torch.arange(keep.numel()).view(keep.shape)",
      "test_packing.py::test_packed_rows_give_each_sample_its_padded_values_and_gradients"),
    m("packing.no-mrope", "minivlm/packing.py", "    if rope is not None:", "    if False:",
      "test_packing.py::test_packed_rows_give_each_sample_its_padded_values_and_gradients"),
    m("packing.cache-kept", "minivlm/precision.py", 'extra = {"use_cache": False, **(', "extra = {**(",
      "test_packing.py::test_packed_rows_give_each_sample_its_padded_values_and_gradients"),
    m("packing.not-applied", "minivlm/logprobs.py", "    if cfg.data.packing:", "    if False:",
      "test_packing.py::test_sft_window_loss_and_gradients_equal_packed_and_padded",
      "test_packing.py::test_packed_rows_give_each_sample_its_padded_values_and_gradients"),
    m("packing.cross-attention-allowed", "minivlm/packing.py", "    if cfg.data.packing and not family.PACKING:",
      "    if False:", "test_packing.py::test_cross_attention_families_cannot_pack_and_are_refused"),
    m("steps.groups-not-sorted", "minivlm/steps.py", "sorted(order[s:s + span], key=lambda i: -lengths[i])",
      "order[s:s + span]", "test_data.py::test_grouped_batches_hold_alike_lengths_and_are_an_epoch_of_their_own_seed"),
    m("steps.longest-not-first", "minivlm/steps.py", "        batches[0], batches[longest] = batches[longest], batches[0]",
      "        pass", "test_data.py::test_grouped_batches_hold_alike_lengths_and_are_an_epoch_of_their_own_seed"),
    m("steps.grouping-ignored", "minivlm/steps.py", "            self._order = (epoch, epoch_batches(len(self.ds), width, self.seed, epoch) if self.lengths is None",
      "            self._order = (epoch, epoch_batches(len(self.ds), width, self.seed, epoch) if True",
      "test_data.py::test_grouped_steps_split_over_ranks_as_one_process_batch"),
    m("loop.padding-not-logged", "minivlm/loop.py", '"padding": 0.0 if self.packed else 1 - real / max(positions, 1)',
      '"padding": 0.0', "test_loop.py::test_log_reports_tokens_per_second_counting_real_tokens"),
    m("generate.prompt-copied", "minivlm/evaluate.py",
      '        if settings.get("num_return_sequences", 1) > 1 and getattr(built.family, "PREFILL_ONCE", True):',
      "        if False:", "test_evaluate.py::test_a_group_of_completions_prefills_each_prompt_once_and_decodes_as_generate"),
    m("generate.cache-not-cropped", "minivlm/evaluate.py", "    cache.crop(-1)\n", "",
      "test_evaluate.py::test_a_group_of_completions_prefills_each_prompt_once_and_decodes_as_generate"),
    m("generate.rope-deltas-not-copied", "minivlm/evaluate.py",
      "            module.rope_deltas = module.rope_deltas.repeat_interleave(group, 0)", "            pass",
      "test_evaluate.py::test_a_group_of_completions_prefills_each_prompt_once_and_decodes_as_generate"),
    m("generate.sliding-past-dropped", "minivlm/evaluate.py", "            layer.activate_past_recording()", "            pass",
      "test_evaluate.py::test_a_group_of_completions_prefills_each_prompt_once_and_decodes_as_generate"),
]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def copy_tree(dest: Path, files: list[str]) -> None:
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def stale(mutants: list[Mutant]) -> list[str]:
    """Mutants whose `old` text no longer occurs exactly once in their file."""
    bad = []
    for mu in mutants:
        if not (ROOT / mu.file).is_file():
            bad.append(f"{mu.name}: {mu.file} no longer exists")
            continue
        count = (ROOT / mu.file).read_text().count(mu.old)
        if count != 1:
            bad.append(f"{mu.name}: {mu.old!r} occurs {count} times in {mu.file}")
    return bad


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "1000"}


def unknown_tests(mutants: list[Mutant]) -> str:
    """pytest's complaint if a test named in `mutants` does not exist (a typo, or a renamed test),
    else "": such a mutant would be 'killed' by pytest refusing to run, not by a test."""
    names = sorted({t for mu in mutants for t in mu.tests})
    proc = subprocess.run(pytest_command("--collect-only", *names), cwd=ROOT, capture_output=True, text=True, env=ENV)
    return "" if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()[-2000:]


def run_one(mu: Mutant, tree: Path, timeout: int) -> tuple[str, str, float]:
    """(fate, the first failing test and its message, seconds). The fate: killed (a test failed, or the
    mutated code no longer imports), timeout (counted as killed), survived, or error (pytest gave
    no verdict, e.g. a test named here does not exist)."""
    path = tree / mu.file
    original = path.read_text()
    path.write_text(original.replace(mu.old, mu.new))
    start = time.time()
    try:
        proc = subprocess.run(pytest_command("-x", "-rfE", *mu.tests), cwd=tree, capture_output=True, text=True,
                              timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired:
        return "timeout", f"the tests ran past {timeout} s", time.time() - start
    finally:
        path.write_text(original)
    seconds = time.time() - start
    if proc.returncode == 0:
        return "survived", "", seconds
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[:300]
    if proc.returncode not in (1, 2):  # 1: a test failed; 2: an import or collection error
        return "error", f"pytest exited {proc.returncode}, which is no verdict on the mutant: {tail}", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (.+)$", proc.stdout, flags=re.M)
    return "killed", failed.group(1)[:300] if failed else f"pytest exited {proc.returncode}: {tail}", seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants (names, or prefixes such as loop.)")
    ap.add_argument("--list", action="store_true", help="list the mutants and check that each edit still applies")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once, each in its own copy (default 2)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant before it counts as killed")
    args = ap.parse_args(argv)
    chosen = [mu for mu in MUTANTS if not args.only or any(mu.name == o or mu.name.startswith(o) for o in args.only)]
    if not chosen:
        sys.exit(f"no mutant named {args.only}; see --list")
    if bad := stale(chosen):
        sys.exit("stale mutants (the code moved; update their `old` text in tests/mutants.py):\n  " + "\n  ".join(bad))
    if args.list:
        for mu in chosen:
            print(f"{mu.name:38} {mu.file}: {mu.old.strip()[:60]!r} -> {mu.new.strip()[:60]!r}")
        print(f"{len(chosen)} mutants, every edit applies")
        return 0

    if complaint := unknown_tests(chosen):
        sys.exit(f"a test named in tests/mutants.py cannot be collected:\n{complaint}")
    files = tracked_files()
    todo: queue.Queue[Mutant] = queue.Queue()
    for mu in chosen:
        todo.put(mu)
    results: dict[str, tuple[str, str, float]] = {}
    lock = threading.Lock()
    start = time.time()

    def worker(tree: Path) -> None:
        copy_tree(tree, files)
        while True:
            try:
                mu = todo.get_nowait()
            except queue.Empty:
                return
            fate, detail, seconds = run_one(mu, tree, args.timeout)
            with lock:
                results[mu.name] = (fate, detail, seconds)
                print(f"[{len(results):>2}/{len(chosen)}] {fate:8} {mu.name:38} {seconds:5.0f} s  {detail}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        threads = [threading.Thread(target=worker, args=(Path(tmp) / f"tree{i}",)) for i in range(max(1, args.jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    killed = [mu for mu in chosen if results[mu.name][0] in ("killed", "timeout")]
    survivors = [mu for mu in chosen if results[mu.name][0] == "survived"]
    errors = [mu for mu in chosen if results[mu.name][0] == "error"]
    print(f"\nkill rate: {len(killed)}/{len(chosen)} = {100 * len(killed) / len(chosen):.0f}% "
          f"in {time.time() - start:.0f} s ({args.jobs} at a time)")
    for mu in survivors:
        print(f"  survived {mu.name}: {mu.why or 'NO REASON GIVEN: a test is missing'}")
    for mu in errors:
        print(f"  error    {mu.name}: {results[mu.name][1]}")
    return 1 if errors or any(not mu.why for mu in survivors) else 0


if __name__ == "__main__":
    sys.exit(main())
