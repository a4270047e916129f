"""TOML config -> dataclasses, validated.

A config is five tables, one dataclass each: [model], [quant], [lora], [data], [train], and a
sixth, [grpo], read when train.objective = "grpo".
Every mistake a user can make in a TOML file ends in one `ConfigError` whose message
names the key and says what would be accepted; `train.py` prints it and exits.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from minivlm.models import DEFAULT as DEFAULT_FAMILY, FAMILIES  # names only: modules are imported when used


class ConfigError(ValueError):
    """A config problem, with a message meant for the user (no traceback needed)."""


@dataclass
class ModelConfig:
    family: str = DEFAULT_FAMILY  # which minivlm/models/<family>.py handles prompts and labels
    name_or_path: str = ""  # hub id or local dir, passed to from_pretrained
    dtype: str = "bfloat16"  # dtype of unquantized weights and of the 4-bit matmuls
    trust_remote_code: bool = False  # run Python code shipped with a hub checkpoint (only for repos you trust)
    # The processor's own resolution controls, named as it names them ([model.processor] max_pixels =
    # 401408 for Qwen-VL): each family lists its own (RESOLUTION in minivlm/models/<family>.py).
    processor: dict = field(default_factory=dict)
    # The video processor's resolution controls ([model.video_processor] max_pixels = 230400 for
    # Qwen-VL's frames), for the families that read video (VIDEO_RESOLUTION in their file).
    video_processor: dict = field(default_factory=dict)


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"  # "nf4" (QLoRA paper) or "fp4"
    double_quant: bool = True  # quantize the per-block absmax constants too (QLoRA paper: ~0.37 bit/param saved)
    skip: list[str] | None = None  # modules left unquantized; None = the family's default


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    shared_dropout: bool = False  # one dropout mask per input tensor (q/k/v share one, gate/up one)
    targets: list[str] | None = None  # names (suffix match) or "re:<regex>"; None = family default
    skip: list[str] | None = None  # never adapted; None = the family's default
    train_modules: list[str] = field(default_factory=list)  # trained in full, saved with the adapter (modules_to_save)
    vision: bool = False  # also adapt every linear of the vision tower's blocks (the family's VISION_BLOCKS)
    use_rslora: bool = False  # rsLoRA: scale the update by alpha/√r instead of alpha/r (PEFT's use_rslora)
    use_dora: bool = False  # DoRA: a trained magnitude per output feature, LoRA on the direction (PEFT's use_dora)
    init: str = "default"  # where A, B start: B = 0, or from W: "pissa", "olora", "loftq" (minivlm/lora_init.py)
    loftq_iterations: int = 1  # LoftQ's alternations of quantize and SVD (PEFT's loftq_iter)


@dataclass
class DataConfig:
    dataset: str = ""  # hub id, local imagefolder dir, or a .jsonl/.parquet file
    train_split: str = "train"
    eval_split: str = ""  # "" = no evaluation split
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"  # with train.objective = "dpo": the preferred (chosen) answers
    rejected_column: str = ""  # train.objective = "dpo": the column of the dispreferred answers
    prompt_template: str = "{question}"  # what the model reads; {question} or any {column}
    answer_template: str = ""  # what it learns to write; "" = the answer column; else any {column}
    system_prompt: str = ""  # a system turn, for chat-template families
    conversations_column: str = ""  # LLaVA-style multi-turn data instead of question/answer columns
    image_root: str = ""  # directory that relative image paths in image_column are under
    on_bad_sample: str = "skip"  # an unreadable image or a null answer: "skip" it (warned, counted) or "fail"
    random_resized_crop: list[float] = field(default_factory=list)  # e.g. [0.9, 1.0]: train-time crop scale
    max_length: int = 256  # longer samples are dropped (never cut through image tokens)
    max_images: int = 1  # images one sample may hold (more are dropped); the memory plan counts this many
    video_column: str = ""  # a video per row: a file (decoded with PyAV) or a list of its frames; "" = no video
    video_frames: int = 8  # frames sampled from each video, evenly over its length (at most this many with video_fps)
    video_fps: float = 0.0  # > 0: sample a video file at this many frames per second instead (a frame list: its rate)
    # Read the training split as a `datasets` stream, never downloaded or loaded whole, for a set
    # that does not fit on disk; needs train.max_steps (a stream has no length). See steps.StreamSteps.
    streaming: bool = False
    shuffle_buffer: int = 1000  # data.streaming: rows a stream is shuffled within (datasets' buffer); 0 = in order
    # Batches of alike lengths: each epoch's shuffle cut into groups of 50 micro-batches, each group
    # sorted by sample length, so that a micro-batch pads little (steps.grouped_batches).
    group_by_length: bool = False
    length_column: str = ""  # data.group_by_length: a column holding each row's length; "" = measured once
    # A micro-batch's samples end to end in one row, nothing padded (TRL's padding_free; packing.py).
    packing: bool = False
    workers: int = 0  # DataLoader processes preparing the next steps' batches while this one trains; 0 = inline
    eval_samples: int = 0  # 0 = the whole eval split
    metric: str = "accuracy"  # how answers are scored: see minivlm/metrics.py
    references_column: str = ""  # column of reference answers for the metric; "" = the answer column
    clip_model: str = "openai/clip-vit-base-patch32"  # the CLIP checkpoint for data.metric = "clip_score"


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    # "sft": learn the answers; "dpo": prefer the chosen answer to the rejected one; "grpo": learn
    # from rewards on sampled answers ([grpo])
    objective: str = "sft"
    dpo_beta: float = 0.1  # DPO's beta: how far the policy may move from the reference (higher: less)
    dpo_label_smoothing: float = 0.0  # cDPO: the probability that a preference label is wrong, in [0, 0.5)
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine", "linear" or "constant" after warmup
    optimizer: str = "paged_adamw_8bit"  # or "adamw_8bit", "adamw"
    lora_plus_ratio: float = 0.0  # LoRA+: each B learns at this × lr (the paper: 16); 0 = off, as plain LoRA
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # Answer tokens whose logits exist at once: the lm_head and log-softmax run on this many rows at a
    # time, recomputed in backward, so no (answer tokens × vocab) tensor is kept (minivlm/logprobs.py).
    # 0 = all at once, as the model's own forward does.
    logits_chunk: int = 256
    # Under torchrun: shard the frozen base's layers across the ranks (FSDP) instead of replicating
    # it (DDP), for a base no single GPU holds. Unverified on GPUs so far (README, distributed.py).
    fsdp: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end (and at each new best)
    keep_checkpoints: int = 2  # the newest saves kept (plus the best); 0 = keep every one
    eval_every: int = 0  # optimizer steps between validation-loss evaluations (needs data.eval_split); 0 = never
    early_stopping_patience: int = 0  # stop after this many evaluations without a better best_by; 0 = never
    best_by: str = "metric"  # what <output_dir>/best is chosen by: "metric" (higher is better) or "val_loss"
    init_from: str = ""  # a checkpoint whose matching trainable weights start this run (LLaVA stage 2)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    max_new_tokens: int = 16
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a NaN/inf loss
    # Experiment trackers sent what log.jsonl gets (minivlm/trackers.py): any of "tensorboard",
    # "wandb", "mlflow", "trackio"; each an optional extra, pip install 'minivlm[wandb]'.
    report_to: list[str] = field(default_factory=list)
    run_name: str = ""  # the trackers' name for this run; "" = output_dir's last part
    project: str = "minivlm"  # the W&B / Trackio project, the MLflow experiment


@dataclass
class GRPOConfig:
    """train.objective = "grpo" (objectives/grpo.py); the names and defaults are TRL's GRPOConfig's."""
    num_generations: int = 8  # completions sampled per prompt: the group its advantages are taken within
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32  # a completion's length limit (TRL: max_completion_length)
    epsilon: float = 0.2  # the ratio's clip below 1 (PPO's ε)
    epsilon_high: float = 0.0  # the clip above 1; 0 = epsilon (DAPO's "clip higher": e.g. 0.28)
    iterations: int = 1  # optimizer steps per sampled batch (TRL: num_iterations, the paper's μ)
    beta: float = 0.0  # the KL term's weight; 0 = no reference model, and no reference forward
    loss_type: str = "dapo"  # "grpo" (per sequence), "dr_grpo" (per max_new_tokens), "dapo" (per token)
    scale_rewards: str = "group"  # "group": advantages over the group's std (GRPO); "none": not (Dr. GRPO)
    # minivlm/rewards.py: "exact_match", "metric", "format", "length", or a user's "module:function"
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: list[float] = field(default_factory=list)  # one per reward; [] = all 1
    format_pattern: str = ""  # the "format" reward: a regular expression the whole completion must match
    overlong_cache: int = 0  # the "length" reward: the last this many tokens before max_new_tokens cost reward


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


# train.report_to's choices: minivlm/trackers.py has one class each.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")

# The training objectives, each a module minivlm/objectives/<name>.py: adding one is its file and
# its name here. (The families' names are minivlm/models' own: families import nothing of minivlm.)
OBJECTIVES = ("sft", "dpo", "grpo")

CHOICES = {
    "data.metric": ("accuracy", "vqa_accuracy", "anls", "relaxed_accuracy", "bleu4", "cider_d", "clip_score"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "quant.quant_type": ("nf4", "fp4"),
    "data.on_bad_sample": ("skip", "fail"),
    "train.objective": OBJECTIVES,
    "lora.init": ("default", "pissa", "olora", "loftq"),  # PEFT's init_lora_weights: True, "pissa", ...
    "train.schedule": ("cosine", "linear", "constant"),
    "train.best_by": ("metric", "val_loss"),
    "train.optimizer": ("paged_adamw_8bit", "adamw_8bit", "adamw"),
    "grpo.loss_type": ("grpo", "dr_grpo", "dapo"),
    "grpo.scale_rewards": ("group", "none"),
}


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file, apply `section.key=value` (or `section.table.key=value`) overrides, the value
    in TOML syntax, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing TOML file, e.g. configs/demo.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=3")
        section, name = key.strip().split(".", 1)
        table, _, inner = name.partition(".")  # model.processor.max_pixels: a key of a table
        if inner:
            raw.setdefault(section, {}).setdefault(table, {})[inner] = _parse_value(value.strip())
        else:
            raw.setdefault(section, {})[name] = _parse_value(value.strip())
    return from_dict(raw)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: treat as a string, so paths need no quotes on the command line


def from_dict(raw: dict) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]{_did_you_mean(section, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        built[section] = _build_section(section, hints[section], values)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}{_did_you_mean(key, hints)}")
        kwargs[key] = _check_type(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _check_type(name: str, value, hint):
    """Accept `value` if it fits `hint` (int where float is asked is fine); else a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


# The names users of the transformers Trainer, PEFT and bitsandbytes configs will type, and ours.
ALIASES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs", "lr_scheduler_type": "schedule", "optim": "optimizer", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets", "modules_to_save": "train_modules",
    "bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
    "llm_int8_skip_modules": "skip", "model_id": "name_or_path", "torch_dtype": "dtype",
    "save_total_limit": "keep_checkpoints", "save_steps": "save_every", "eval_steps": "eval_every",
    "dataloader_num_workers": "workers",
    "beta": "dpo_beta", "label_smoothing": "dpo_label_smoothing", "loraplus_lr_ratio": "lora_plus_ratio",
    "init_lora_weights": "init", "loftq_iter": "loftq_iterations",
}


def _did_you_mean(word: str, candidates) -> str:
    if ALIASES.get(word) in candidates:
        return f"; did you mean {ALIASES[word]!r}?"
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(candidates)}"


def validate(cfg: Config) -> None:
    """Impossible values, each with the key that holds it."""
    checks = [
        (cfg.model.family in FAMILIES, "model.family", f"must be one of {sorted(FAMILIES)}"),
        (cfg.lora.r > 0, "lora.r", "must be > 0 (the adapter rank)"),
        (cfg.lora.alpha > 0, "lora.alpha", "must be > 0 (the update is scaled by alpha/r)"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (cfg.train.logits_chunk >= 0, "train.logits_chunk", "must be >= 0 (answer tokens per chunk; 0 = all at once)"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (cfg.train.epochs >= 1 or cfg.train.max_steps > 0, "train.epochs", "must be >= 1 (or set train.max_steps)"),
        (cfg.train.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = use epochs)"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (cfg.train.lora_plus_ratio >= 0, "train.lora_plus_ratio", "must be >= 0 (0 = off; LoRA+ suggests 16)"),
        (cfg.lora.loftq_iterations >= 1, "lora.loftq_iterations", "must be >= 1"),
        (not cfg.lora.use_dora or cfg.lora.init == "default", "lora.use_dora",
         f"and lora.init = {cfg.lora.init!r} are both set: DoRA starts from B = 0 here; pick one of them"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = no clipping)"),
        (len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "train.betas",
         "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
        (not (cfg.train.fp16 and cfg.train.bf16), "train.fp16", "and train.bf16 are both true; pick one"),
        (not cfg.data.random_resized_crop or (len(cfg.data.random_resized_crop) == 2
         and 0 < cfg.data.random_resized_crop[0] <= cfg.data.random_resized_crop[1] <= 1),
         "data.random_resized_crop", "must be [] or [min_scale, max_scale] with 0 < min <= max <= 1"),
        (cfg.data.max_length > 0, "data.max_length", "must be > 0"),
        (cfg.data.max_images > 0, "data.max_images", "must be > 0"),
        (cfg.data.video_frames > 0, "data.video_frames", "must be > 0"),
        (cfg.data.video_fps >= 0, "data.video_fps", "must be >= 0 (0: video_frames frames, evenly spaced)"),
        (cfg.data.workers >= 0, "data.workers", "must be >= 0 (0 = prepare batches in the training process)"),
        (cfg.data.eval_samples >= 0, "data.eval_samples", "must be >= 0 (0 = all)"),
        (not cfg.data.streaming or cfg.train.max_steps > 0, "train.max_steps",
         "must be set with data.streaming = true: a stream has no length to count epochs in"),
        (not cfg.data.streaming or not cfg.data.eval_split or cfg.data.eval_samples > 0, "data.eval_samples",
         "must be set with data.streaming = true and a data.eval_split: the eval split's first data.eval_samples "
         "rows are read into memory once and scored at every evaluation (e.g. 500)"),
        (not (cfg.data.group_by_length and cfg.data.streaming), "data.group_by_length",
         "needs every row's length before the epoch starts, and a stream (data.streaming = true) is read in "
         "order; set one of them false"),
        (not cfg.data.length_column or cfg.data.group_by_length, "data.length_column",
         "is read only with data.group_by_length = true; set that too, or leave the column empty"),
        (not (cfg.data.packing and cfg.train.objective == "grpo"), "data.packing",
         "is for train.objective = \"sft\" and \"dpo\": GRPO scores left-padded prompts and the padding after "
         "each completion's end; set data.packing = false"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 = the stream's own order)"),
        (cfg.train.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)"),
        (cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = keep every save)"),
        (cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = never)"),
        (not cfg.train.eval_every or cfg.data.eval_split, "train.eval_every", "needs data.eval_split"),
        (cfg.train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0 = never)"),
        (not cfg.train.early_stopping_patience or cfg.train.eval_every, "train.early_stopping_patience",
         "needs train.eval_every > 0"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
         "must be >= 1 (consecutive NaN/inf-loss steps before the run stops)"),
        (cfg.train.dpo_beta > 0, "train.dpo_beta", "must be > 0 (the scale of DPO's implicit reward, e.g. 0.1)"),
        (0 <= cfg.train.dpo_label_smoothing < 0.5, "train.dpo_label_smoothing",
         "must be in [0, 0.5) (the probability that a preference label is flipped; 0 = plain DPO)"),
        (cfg.train.objective != "dpo" or cfg.data.rejected_column, "data.rejected_column",
         "is empty, and train.objective = \"dpo\" needs it: the column of the rejected answers (e.g. \"rejected\"); "
         "data.answer_column holds the chosen ones"),
        (cfg.train.objective != "dpo" or not cfg.lora.train_modules or cfg.train.init_from, "lora.train_modules",
         "needs train.init_from with train.objective = \"dpo\": the reference model is the base with its adapters "
         "switched off, and a module trained in full has no such switch; start from a checkpoint that holds it"),
        (cfg.train.objective != "dpo" or not cfg.data.conversations_column, "data.conversations_column",
         "is set, and train.objective = \"dpo\" compares two answers to one prompt; leave it empty and set "
         "data.question_column, data.answer_column (chosen) and data.rejected_column"),
        *_grpo_checks(cfg),
        (cfg.train.device in ("auto", "cpu") or cfg.train.device.startswith("cuda"), "train.device",
         "must be 'auto', 'cpu' or 'cuda[:N]'"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key} = {_get(cfg, key)!r} {msg}")
    for name in cfg.train.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to has {name!r}, which is not one of {list(TRACKERS)}"
                              f"{_did_you_mean(name, TRACKERS)}")
    for key in ("lora.targets", "lora.skip", "lora.train_modules", "quant.skip"):
        _check_patterns(key, _get(cfg, key) or [])
    if cfg.train.objective == "grpo":
        try:
            re.compile(cfg.grpo.format_pattern)
        except re.error as e:
            raise ConfigError(f"grpo.format_pattern = {cfg.grpo.format_pattern!r} is not a valid regular expression "
                              f"({e}); fix it") from None
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {list(allowed)}{_did_you_mean(value, allowed)}")


BUILT_IN_REWARDS = ("exact_match", "metric", "format", "length")  # minivlm/rewards.py


def _grpo_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """validate's checks of [grpo], and of what train.objective = "grpo" rules out elsewhere."""
    g = cfg.grpo
    if cfg.train.objective != "grpo":
        return []
    unknown = [r for r in g.rewards if r not in BUILT_IN_REWARDS and ":" not in r]
    return [
        (g.num_generations >= 2, "grpo.num_generations",
         "must be >= 2: advantages compare a completion with the others of its prompt's group"),
        (g.temperature > 0, "grpo.temperature", "must be > 0 (sampling; 1 = the model's own distribution)"),
        (0 < g.top_p <= 1, "grpo.top_p", "must be in (0, 1]"),
        (g.max_new_tokens >= 1, "grpo.max_new_tokens", "must be >= 1"),
        (g.epsilon > 0, "grpo.epsilon", "must be > 0 (e.g. 0.2)"),
        (g.epsilon_high == 0 or g.epsilon_high >= g.epsilon, "grpo.epsilon_high",
         "must be 0 (= grpo.epsilon) or >= grpo.epsilon (DAPO's clip higher, e.g. 0.28)"),
        (g.iterations >= 1, "grpo.iterations", "must be >= 1 (optimizer steps per sampled batch)"),
        (g.beta >= 0, "grpo.beta", "must be >= 0 (0 = no KL term)"),
        (bool(g.rewards), "grpo.rewards", f"is empty; name at least one: {list(BUILT_IN_REWARDS)} or module:function"),
        (not unknown, "grpo.rewards", f"has {unknown}, which is neither built in ({list(BUILT_IN_REWARDS)}) nor "
         "a module:function of yours"),
        (not g.reward_weights or len(g.reward_weights) == len(g.rewards), "grpo.reward_weights",
         f"must be [] or one weight for each of the {len(g.rewards)} grpo.rewards"),
        ("format" not in g.rewards or g.format_pattern, "grpo.format_pattern",
         "is empty, and grpo.rewards has \"format\": give the regular expression a completion must match"),
        ("length" not in g.rewards or 0 < g.overlong_cache < g.max_new_tokens, "grpo.overlong_cache",
         "must be in (0, grpo.max_new_tokens) with the \"length\" reward: the tokens before the limit over "
         "which a completion's reward falls to -1 (DAPO uses 4096 of 20480)"),
        (cfg.train.best_by == "metric", "train.best_by",
         "must be \"metric\" with train.objective = \"grpo\": it has no validation loss"),
        (not cfg.train.fsdp, "train.fsdp", "is not supported with train.objective = \"grpo\" yet (sampling "
         "under FSDP is not tested); use DDP (train.fsdp = false)"),
        (not cfg.data.conversations_column, "data.conversations_column",
         "is set, and train.objective = \"grpo\" samples answers to one prompt per row; leave it empty and "
         "set data.question_column (or data.prompt_template)"),
        (not cfg.lora.train_modules or not g.beta or cfg.train.init_from, "lora.train_modules",
         "needs train.init_from with train.objective = \"grpo\" and grpo.beta > 0: the reference model is the "
         "base with its adapters switched off, and a module trained in full has no such switch"),
    ]


def _check_patterns(key: str, patterns: list[str]) -> None:
    """Module-name patterns as minivlm.modules.matches reads them: a bad "re:<regex>" is caught
    here, at load, not as a re.error traceback once the model is built (that module imports
    torch, which the config must not)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e}); fix it, or "
                                  "drop the re: prefix to match module names literally") from None


def check_output_path(path: str | Path, flag: str, directory: bool) -> Path:
    """`path` if it can be written (a file, or a directory when `directory`), else a ConfigError
    naming the flag: checked before any model is loaded, so a typo costs a second, not a load."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, and the output is a directory; give a new path")
    if not directory and path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name in it, e.g. {path / 'answers.jsonl'}")
    # The nearest existing directory is where the first write happens (missing ones get created).
    nearest = path if directory and path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"{flag} {path}: {nearest} is a file, not a directory; give a path under a directory")
    try:  # a real write: os.access says yes to root on read-only mounts' bind points and ACLs alike
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {nearest} ({e.strerror}); give a writable location") from None
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is read-only; give another file name")
    return path


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# The config keys a resumed run may change: they decide what is logged, evaluated and saved, on
# which device, and for how long, not what one optimizer step computes. Every other key must be
# what the checkpoint was trained with, so a key added to Config later is protected by default.
# A new max_steps/epochs extends (or shortens) the run; the learning-rate schedule is then the one
# for the new total (lr_at is a function of step and total), as in the transformers Trainer,
# which also recomputes its schedule from the arguments it is resumed with.
FREE_ON_RESUME = frozenset({
    "train.output_dir", "train.max_steps", "train.epochs", "train.save_every", "train.keep_checkpoints",
    "train.eval_every", "train.early_stopping_patience", "train.best_by", "train.init_from", "train.device",
    "train.max_new_tokens", "train.gradient_checkpointing", "train.logits_chunk", "train.max_nonfinite_steps",
    "data.eval_split", "data.eval_samples", "data.metric", "data.references_column", "data.clip_model",
    "data.workers", "train.report_to", "train.run_name", "train.project",
})


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """`section.key: old -> new` for each config key whose change would make a resumed run another run.

    `saved` is the config stored in a checkpoint's state.json, `current` the run's (config.to_dict).
    A key the saved config lacks (written before that key existed) is not compared.
    """
    free = FREE_ON_RESUME
    if current.get("train", {}).get("objective") in ("dpo", "grpo"):
        # DPO's and GRPO's reference model is that adapter (objectives/reference.py): another is another loss
        free = free - {"train.init_from"}
    conflicts = []
    for section, values in current.items():
        for key, new in values.items():
            old = saved.get(section, {}).get(key, new)
            if f"{section}.{key}" not in free and old != new:
                conflicts.append(f"{section}.{key}: {old!r} -> {new!r}")
    return conflicts
