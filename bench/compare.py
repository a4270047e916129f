"""minivlm against what users run today: PEFT + the transformers Trainer, on the same QLoRA job.

    .venv/bin/python bench/compare.py                 (or: make bench; needs `make data`)
    .venv/bin/python bench/compare.py --quick         (tiny sizes, one run each: a smoke test)

The model is a PaliGemma (SigLIP vision tower + Gemma decoder) with random weights, built once
from the size flags and saved with `save_pretrained` and a real `PaliGemmaProcessor` under
bench/.cache/, so both sides load it through `from_pretrained` like a hub checkpoint. The
defaults are small enough for a CPU but keep what dominates a real PaliGemma step: 256 image
tokens per sample (224 px, patch 14), the real vocabulary of 257152 (so the lm_head and the
loss cost what they cost in PaliGemma-3B) and ≥ 50M parameters in the decoder's linears. The
tokenizer is the demo's small byte-level BPE; the model's vocabulary may be larger than it.
`--hidden 2048 --intermediate 16384 --layers 18 ...` (see bench/README.md) is PaliGemma-3B's shape.

The job: the demo's shapes-qa data (`make data`), question -> answer, loss on the answer only,
NF4 + double quantization of the decoder's linears, LoRA on its q/k/v/o/gate/up/down
projections, 8-bit AdamW, cosine schedule, gradient clipping.

    minivlm        a TOML config -> minivlm.build.build -> minivlm.loop.train
    PEFT+Trainer   from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))
                   -> get_peft_model(LoraConfig) -> Trainer(optim="paged_adamw_8bit").train()
                   with a collator calling the PaliGemmaProcessor (labels from `suffix`)

The PEFT side does not call `prepare_model_for_kbit_training`: none of the seed recipes
(/work/shared/seeds) does, and it would change the math (upcast every unquantized weight to
fp32, turn on gradient checkpointing), which minivlm does not do by default.

Each run is a fresh process (spawn), the sides alternate (A B A B ...), and the table shows
medians over `--runs` runs of each side.

What is aligned, so the two loss curves can be compared step by step:
  - the model, the quantized modules (the decoder's linears; not the vision tower, projector,
    lm_head or embeddings) and the adapted ones (the decoder's seven projections), both checked
    equal between the sides;
  - the data order: the Trainer's sampler returns minivlm's `epoch_batches` order;
  - the LoRA A matrices: after both models are built, each side's A is overwritten from one
    generator keyed by the module's name (B = 0 on both sides, as both libraries init it);
  - the loss: per answer token, averaged over the accumulation window (minivlm's loop does
    this; transformers 5's Trainer passes `num_items_in_batch`, counted over labels[..., 1:]);
  - lr, schedule, betas, weight decay, clipping, seed, dtype and autocast, DataLoader workers.
What is not: the dropout masks (different RNG streams), and the warmup. Both use a linear
warmup, but the Trainer's gives step 1 a learning rate of 0 and minivlm's lr/(W+1), so the
bench defaults to --warmup 0 where both schedules are the same cosine.

Measured per run, in the child process:
  - samples/s and tokens/s (non-padding tokens) in steady state: from the end of optimizer step
    2 to the end of the last, so model load, the first steps' warm-up and the final save are
    out. Both sides are observed the same way, through torch hooks only (see StepRecorder): a
    global optimizer step post-hook timestamps each step's end, a forward pre-hook on the
    PaliGemma model counts each micro-batch's tokens;
  - the loss of every step (minivlm's log.jsonl; the Trainer's logs with logging_steps=1);
  - peak memory: the process's peak RSS, and on CUDA torch.cuda.max_memory_allocated;
  - load time (processor + model + adapters) and the whole train() call.

Results go to bench/results/<date>-<machine>.json and .md. The script exits with status 1 if
the two loss curves differ by more than --tolerance (relative, default 2%) at any step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Kept unquantized on the PEFT side, as minivlm's paligemma family does. Full dotted prefixes:
# transformers 5 matches llm_int8_skip_modules from the start of a module's name or as its suffix,
# so the short "vision_tower" of 4.x-era recipes no longer matches "model.vision_tower.encoder...":
# it would silently quantize the SigLIP tower and the projector.
QUANT_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head", "embed_tokens"]
PALIGEMMA_VOCAB = 257152
# The model's sizes (--hidden, --kv-heads, ...) and their defaults: a Gemma 768/3072 × 8 decoder with the
# real vocabulary and a SigLIP 224/14 tower.
MODEL_SIZES = dict(hidden=768, intermediate=3072, layers=8, heads=8, kv_heads=1, head_dim=96, vocab=PALIGEMMA_VOCAB,
                   vision_hidden=384, vision_intermediate=1536, vision_layers=2, vision_heads=6, image_size=224,
                   patch=14)
# The flags that define the model (and so its cache directory).
SIZE_FLAGS = (*MODEL_SIZES, "seed", "dtype")

# Sizes a smoke test runs in seconds; everything else stays as given.
QUICK = dict(hidden=64, intermediate=256, layers=2, heads=2, kv_heads=1, head_dim=32, vocab=4096,
             vision_hidden=64, vision_intermediate=128, vision_layers=1, vision_heads=2, image_size=112,
             steps=4, batch_size=2, runs=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_argument_group("model (random weights, PaliGemma architecture)")
    for name, default in MODEL_SIZES.items():
        size.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    job = ap.add_argument_group("training job")
    job.add_argument("--steps", type=int, default=8, help="optimizer steps per run (>= 3)")
    job.add_argument("--batch-size", type=int, default=4)
    job.add_argument("--grad-accum", type=int, default=1)
    job.add_argument("--lr", type=float, default=1e-3)
    job.add_argument("--warmup", type=int, default=0, help="the sides' warmups differ (see above); 0 = aligned")
    job.add_argument("--weight-decay", type=float, default=0.0)
    job.add_argument("--max-grad-norm", type=float, default=1.0)
    job.add_argument("--r", type=int, default=8)
    job.add_argument("--alpha", type=float, default=16.0)
    job.add_argument("--dropout", type=float, default=0.05)
    job.add_argument("--dtype", choices=DTYPE_NAMES, help="weights and compute; bfloat16/float16 also turn on the "
                     "matching autocast on both sides (default: bfloat16 on a CUDA GPU, else float32)")
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra minivlm config override, e.g. train.gradient_checkpointing=true (repeatable)")
    run = ap.add_argument_group("bench")
    job.add_argument("--workers", type=int, default=0, help="DataLoader worker processes, both sides")
    run.add_argument("--runs", type=int, default=3, help="runs per side, alternating")
    run.add_argument("--data", default="data/shapes-qa", help="the imagefolder `make data` writes")
    run.add_argument("--tolerance", type=float, default=0.02, help="largest relative loss difference accepted")
    run.add_argument("--out", default="bench/results")
    run.add_argument("--quick", action="store_true", help="tiny sizes, few steps, one run: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    if args.steps < 3:
        ap.error("--steps must be >= 3: steady-state timing starts after step 2")
    if args.dtype is None:
        import torch
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


# Run as a script, the arguments are read before the imports below (torch: seconds), so that --help
# and a mistyped option answer at once; main() reads them again. (The spawned runs import this file
# under another name, and skip this.)
if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


# ---------------------------------------------------------------------------------------------
# The model


def model_dir(args: argparse.Namespace) -> Path:
    """The cache directory of the model these size flags describe (built once, then reused)."""
    sizes = {k: getattr(args, k) for k in SIZE_FLAGS}
    digest = hashlib.sha1(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:8]
    return ROOT / "bench" / ".cache" / f"paligemma-{args.hidden}x{args.layers}-v{args.vision_hidden}x{args.vision_layers}-{digest}"


def build_model(sizes: dict, out: str) -> dict:
    """Build a random-weight PaliGemma with a real processor, save both to `out`; return parameter counts."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from demo.pretrain_base import make_processor

    # The demo base's byte-level BPE tokenizer; PaliGemmaProcessor adds PaliGemma's 1152 <locXXXX>
    # and <segXXX> tokens to it. A 224 px image in patches of 14 is 16 × 16 = 256 image tokens.
    tokenizer = make_processor().tokenizer
    image_processor = SiglipImageProcessorPil(size={"height": sizes["image_size"], "width": sizes["image_size"]})
    image_processor.image_seq_length = (sizes["image_size"] // sizes["patch"]) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if len(processor.tokenizer) > sizes["vocab"]:
        raise ValueError(f"--vocab {sizes['vocab']} is smaller than the tokenizer ({len(processor.tokenizer)} tokens)")

    vision = SiglipVisionConfig(hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_intermediate"],
                                num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                                image_size=sizes["image_size"], patch_size=sizes["patch"],
                                vision_use_head=False)  # PaliGemma reads every patch token, no pooling head
    text = GemmaConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                       num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                       num_key_value_heads=sizes["kv_heads"], head_dim=sizes["head_dim"],
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             projection_dim=sizes["hidden"])
    torch.manual_seed(sizes["seed"])
    model = PaliGemmaForConditionalGeneration(config).to(DTYPES[sizes["dtype"]])
    decoder = model.model.language_model
    counts = {
        "decoder_linears": sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear)),
        "embedding (tied lm_head)": decoder.embed_tokens.weight.numel(),
        "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
        "tokenizer": len(processor.tokenizer),
        "image_tokens": image_processor.image_seq_length,
    }
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (Path(out) / "bench_counts.json").write_text(json.dumps(counts, indent=1))
    return counts


# ---------------------------------------------------------------------------------------------
# What both sides share: LoRA A init, step timing, token counting


def adapter_key(name: str) -> str:
    """A LoRA module's name from `language_model.` on: the same on both sides, whatever wraps the model
    (a vision tower's adapter, lora.vision, keeps its whole name)."""
    return name[name.index("language_model."):] if "language_model." in name else name


@torch.no_grad()
def set_lora_A(weights: dict[str, torch.Tensor], seed: int) -> None:
    """Overwrite each A (r × in) in place from a generator keyed by its module's name.

    Same distribution as both libraries' own init (kaiming_uniform with a=√5: U(±1/√in)), but
    the same numbers on both sides, so the runs differ only where the libraries do.
    """
    for key, weight in weights.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        bound = weight.shape[1] ** -0.5
        weight.copy_((torch.rand(weight.shape, generator=g) * 2 - 1) * bound)


class StepRecorder:
    """Times optimizer steps and counts the tokens the model is fed, without touching either library.

    Two torch hooks, the same on both sides: a global optimizer step post-hook (it fires after
    every `Optimizer.step`, whoever built the optimizer) and a forward pre-hook on the PaliGemma
    model that adds up each batch's attention mask.
    """

    def __init__(self, model: torch.nn.Module, cuda: bool):
        self.cuda = cuda
        self.step_ends: list[float] = []
        self.batch_tokens: list[int] = []  # non-padding tokens per forward (micro-batch), in order
        register_optimizer_step_post_hook(self._step_end)
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _step_end(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: wait for the step to be done
        self.step_ends.append(time.perf_counter())

    def _forward(self, module, args, kwargs) -> None:
        self.batch_tokens.append(int(kwargs["attention_mask"].sum()))

    def result(self, grad_accum: int) -> dict:
        n = len(self.step_ends)
        per_step = [sum(self.batch_tokens[i * grad_accum:(i + 1) * grad_accum]) for i in range(n)]
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return {"step_ends": self.step_ends, "step_tokens": per_step, "peak_rss_mib": peak_rss,
                "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None}


# ---------------------------------------------------------------------------------------------
# The two sides, each run in a fresh process


def run_minivlm(spec: dict) -> dict:
    """minivlm as a user runs it: a TOML config, build(), load_split(), train()."""
    from minivlm.build import build
    from minivlm.config import load_config
    from minivlm.data import load_split
    from minivlm.loop import train

    out = Path(spec["work"]) / "minivlm"
    out.mkdir(parents=True)
    config = out / "bench.toml"
    config.write_text(f"""\
[model]
family = "paligemma"
name_or_path = "{spec['model']}"
dtype = "{spec['dtype']}"

[quant]
load_in_4bit = true
quant_type = "nf4"
double_quant = true

[lora]
r = {spec['r']}
alpha = {spec['alpha']}
dropout = {spec['dropout']}

[data]
dataset = "{spec['data']}"
max_length = 1024  # no sample dropped: 256 image tokens + a short question and answer
{f"workers = {spec['workers']}" if spec['workers'] else ""}

[train]
output_dir = "{out / 'run'}"
seed = {spec['seed']}
max_steps = {spec['steps']}
batch_size = {spec['batch_size']}
grad_accum = {spec['grad_accum']}
lr = {spec['lr']}
weight_decay = {spec['weight_decay']}
warmup_steps = {spec['warmup']}
schedule = "cosine"
optimizer = "paged_adamw_8bit"
max_grad_norm = {spec['max_grad_norm']}
bf16 = {str(spec['dtype'] == 'bfloat16').lower()}
fp16 = {str(spec['dtype'] == 'float16').lower()}
""")
    cfg = load_config(config, spec["set"])
    plan = planned(cfg)
    t0 = time.perf_counter()
    built = build(cfg)
    if getattr(cfg.lora, "init", "default") == "default":  # a start taken from W (ablate.py's lora.init variants) is kept as made
        # The decoder's A as the PEFT side draws them; lora.vision's are the variant's own.
        set_lora_A({adapter_key(name): built.model.get_submodule(name).lora_A for name in built.adapted
                    if "language_model." in name}, spec["seed"])
    load_s = time.perf_counter() - t0
    ds = load_split(cfg.data, cfg.data.train_split)

    try:  # train() takes the objective since minivlm/objectives/; ablate.py may run a checkout from before
        from minivlm.objectives import sft
        objective = (sft,)
    except ImportError:
        objective = ()

    recorder = StepRecorder(built.model, built.device.type == "cuda")
    t0 = time.perf_counter()
    train(cfg, built, *objective, ds)
    train_s = time.perf_counter() - t0

    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"side": "minivlm", "device": str(built.device), "load_s": load_s, "train_s": train_s,
            "loss": [r["loss"] for r in steps], "grad_norm": [r["grad_norm"] for r in steps],
            "adapted": sorted(adapter_key(n) for n in built.adapted), "quantized": sorted(built.quantized),
            "trainable": built.trainable_params, "plan": plan,
            **recorder.result(cfg.train.grad_accum)}


def planned(cfg) -> dict:
    """--dry-run's peak for the config, with and without the CUDA context (which
    torch.cuda.max_memory_allocated does not see). {} for a checkout from before minivlm/plan.py."""
    try:
        from minivlm.plan import CUDA_CONTEXT, plan_memory
    except ImportError:
        return {}
    total = plan_memory(cfg).total()
    return {"planned_mib": total / 2**20, "planned_without_context_mib": (total - CUDA_CONTEXT) / 2**20}


def run_peft(spec: dict) -> dict:
    """PEFT + Trainer as the seed recipes write it: 4-bit from_pretrained, get_peft_model, Trainer."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import (BitsAndBytesConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, Trainer,
                              TrainerCallback, TrainingArguments)
    from datasets import load_dataset

    dtype = DTYPES[spec["dtype"]]
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    processor = PaliGemmaProcessor.from_pretrained(spec["model"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=QUANT_SKIP)
    model = PaliGemmaForConditionalGeneration.from_pretrained(spec["model"], quantization_config=quant, dtype=dtype,
                                                              device_map="cuda" if cuda else "cpu")
    quantized = sorted(name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    # A regex (full match) keeps the adapters in the language model: SigLIP has q/k/v_proj too.
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], bias="none",
                      target_modules=rf".*language_model\..*\.({'|'.join(PROJECTIONS)})")
    model = get_peft_model(model, lora)
    adapters = {adapter_key(name): m.lora_A["default"].weight for name, m in model.named_modules()
                if isinstance(m, LoraLayer)}
    set_lora_A(adapters, spec["seed"])
    load_s = time.perf_counter() - t0

    ds = load_dataset("imagefolder", data_dir=spec["data"], split="train")
    recorder = StepRecorder(model.get_base_model(), cuda)

    def collate(rows: list[dict]) -> dict:
        batch = processor(images=[r["image"].convert("RGB") for r in rows],
                          text=[processor.image_token + r["question"] for r in rows],
                          suffix=[r["answer"] for r in rows], padding="longest", return_tensors="pt")
        return dict(batch)  # labels: the processor's, -100 outside the suffix

    class AlignedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return spec["order"]  # minivlm's sample order, flattened; the Trainer batches it the same way

    losses, grad_norms = [], []

    class LogLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                grad_norms.append(logs.get("grad_norm"))

    args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "peft"), optim="paged_adamw_8bit", learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=spec["warmup"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["steps"], seed=spec["seed"],
        bf16=spec["dtype"] == "bfloat16", fp16=spec["dtype"] == "float16", max_grad_norm=spec["max_grad_norm"],
        weight_decay=spec["weight_decay"], logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=spec["workers"], remove_unused_columns=False, disable_tqdm=True)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                             callbacks=[LogLosses()])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    return {"side": "peft", "device": str(model.device), "load_s": load_s, "train_s": train_s,
            "loss": losses, "grad_norm": grad_norms, "adapted": sorted(adapters), "quantized": quantized,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loss_per_window_token": trainer.model_accepts_loss_kwargs,
            **recorder.result(spec["grad_accum"])}


SIDES = {"minivlm": run_minivlm, "peft": run_peft}


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, in bytes."""
    current = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory() as peak:` ... `peak.bytes`: the block's peak memory less what was in use
    before it: torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (which never
    comes down: run the block in a fresh process)."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.before, _ = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.bytes = (torch.cuda.max_memory_allocated() if self.cuda else rss_bytes()[1]) - self.before


def in_fresh_process(fn, *args):
    """fn(*args) in a new spawned interpreter: nothing loaded or allocated carries over between runs.
    (An executor's process, not a multiprocessing.Pool's: a Pool's are daemons, which may not start
    the DataLoader's worker processes.)"""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------------------------------------
# Report


def steady(run: dict, samples_per_step: int) -> dict:
    """Rates from the end of step 2 to the end of the last step."""
    ends, tokens = run["step_ends"], run["step_tokens"]
    seconds = ends[-1] - ends[1]
    return {"samples_per_s": samples_per_step * (len(ends) - 2) / seconds,
            "tokens_per_s": sum(tokens[2:]) / seconds, "s_per_step": seconds / (len(ends) - 2)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import bitsandbytes
    import peft
    import transformers
    info = {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    info["name"] = (re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-") if info["gpu"]
                    else f"cpu-{info['cores']}core")
    return info


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    samples_per_step = args.batch_size * args.grad_accum
    summary = {}
    for side, side_runs in runs.items():
        rates = [steady(r, samples_per_step) for r in side_runs]
        peak = "peak_cuda_mib" if side_runs[0]["peak_cuda_mib"] is not None else "peak_rss_mib"
        summary[side] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rates),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rates),
            "s_per_step": statistics.median(r["s_per_step"] for r in rates),
            "peak_mib": statistics.median(r[peak] for r in side_runs), "peak_kind": peak,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in side_runs),
            "load_s": statistics.median(r["load_s"] for r in side_runs),
            "train_s": statistics.median(r["train_s"] for r in side_runs),
            "loss": [statistics.median(step) for step in zip(*(r["loss"] for r in side_runs))],
            "plan": side_runs[0].get("plan", {}),  # the same config in every run
        }
    m, p = summary["minivlm"], summary["peft"]
    summary["ratio"] = {k: m[k] / p[k] for k in ("samples_per_s", "tokens_per_s", "peak_mib", "peak_rss_mib")}
    summary["loss_rel_diff"] = [abs(a - b) / abs(b) for a, b in zip(m["loss"], p["loss"])]
    return summary


def markdown(report: dict) -> str:
    s, mach, counts = report["summary"], report["machine"], report["model"]
    m, p, ratio = s["minivlm"], s["peft"], s["ratio"]
    peak = "peak CUDA memory (MiB)" if m["peak_kind"] == "peak_cuda_mib" else "peak RSS (MiB)"
    a = report["args"]
    lines = [
        f"# minivlm vs PEFT + Trainer, {report['date']}, {mach['name']}",
        "",
        f"Machine: {mach['gpu'] or mach['cpu']}, {mach['cores']} cores, {mach['platform']}; torch {mach['torch']}, "
        f"transformers {mach['transformers']}, bitsandbytes {mach['bitsandbytes']}, peft {mach['peft']}.",
        "",
        f"Model: PaliGemma shape, random weights: decoder linears {counts['decoder_linears'] / 1e6:.1f}M "
        f"(hidden {a['hidden']}, intermediate {a['intermediate']}, {a['layers']} layers, {a['heads']} heads, "
        f"{a['kv_heads']} kv, head_dim {a['head_dim']}), vocab {a['vocab']}, SigLIP {a['vision_hidden']} × "
        f"{a['vision_layers']} layers, {counts['image_tokens']} image tokens; {counts['total'] / 1e6:.1f}M parameters.",
        f"Job: {a['steps']} steps × batch {a['batch_size']} × accumulation {a['grad_accum']}, {a['dtype']}, "
        f"LoRA r {a['r']} alpha {a['alpha']} dropout {a['dropout']}, lr {a['lr']}, warmup {a['warmup']}; "
        f"medians of {a['runs']} runs per side, alternating, each in a fresh process."
        + (f" minivlm overrides: {' '.join(a['set'])}." if a["set"] else ""),
        "",
        "| | minivlm | PEFT + Trainer | minivlm / PEFT |",
        "|---|---:|---:|---:|",
        f"| samples/s (steady, from step 3) | {m['samples_per_s']:.3f} | {p['samples_per_s']:.3f} | {ratio['samples_per_s']:.2f} |",
        f"| tokens/s (non-padding) | {m['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} | {ratio['tokens_per_s']:.2f} |",
        f"| {peak} | {m['peak_mib']:.0f} | {p['peak_mib']:.0f} | {ratio['peak_mib']:.2f} |",
        f"| load (s) | {m['load_s']:.1f} | {p['load_s']:.1f} | |",
        f"| whole train() call (s) | {m['train_s']:.1f} | {p['train_s']:.1f} | |",
        "",
        "| step | minivlm loss | PEFT loss | relative difference |",
        "|---:|---:|---:|---:|",
        *(f"| {i + 1} | {a_:.4f} | {b:.4f} | {d:.2%} |"
          for i, (a_, b, d) in enumerate(zip(m["loss"], p["loss"], s["loss_rel_diff"]))),
        "",
        f"Largest relative loss difference: {max(s['loss_rel_diff']):.2%} (tolerance {a['tolerance']:.0%}).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def data_order(n: int, args: argparse.Namespace) -> list[int]:
    """The sample indices minivlm's loop trains on, in order, flattened for the Trainer's sampler.

    The Trainer cuts the list into batches of --batch-size, so every minivlm batch used must be
    full (a last, short batch of an epoch would shift the Trainer's batches from there on)."""
    from minivlm.steps import epoch_batches, steps_per_epoch

    per_epoch = steps_per_epoch(n, args.batch_size, args.grad_accum)
    order = []
    for step in range(args.steps):
        epoch, offset = divmod(step, per_epoch)
        window = epoch_batches(n, args.batch_size, args.seed, epoch)[offset * args.grad_accum:(offset + 1) * args.grad_accum]
        if [len(b) for b in window] != [args.batch_size] * args.grad_accum:
            raise SystemExit(f"step {step + 1} ends an epoch with a short batch; pick a --batch-size × --grad-accum "
                             f"that divides the {n} training samples, or fewer --steps")
        order += [i for batch in window for i in batch]
    return order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = ROOT / args.data
    if not (data / "train" / "metadata.jsonl").exists():
        raise SystemExit(f"no data at {data}: run `make data` first")
    n = sum(1 for _ in (data / "train" / "metadata.jsonl").open())

    path = model_dir(args)
    if not (path / "bench_counts.json").exists():
        print(f"building the model in {path} ...", flush=True)
        in_fresh_process(build_model, {k: getattr(args, k) for k in SIZE_FLAGS}, str(path))
    counts = json.loads((path / "bench_counts.json").read_text())
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items() if k not in ("tokenizer", "image_tokens"))
          + f"; tokenizer {counts['tokenizer']} tokens (model vocab {args.vocab}), {counts['image_tokens']} image tokens")

    spec = {"model": str(path), "data": str(data), "order": data_order(n, args), "set": args.set,
            **{k: getattr(args, k) for k in ("seed", "steps", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
                                             "max_grad_norm", "r", "alpha", "dropout", "dtype", "workers")}}
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i in range(args.runs):
        for side, fn in SIDES.items():
            with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as work:
                t0 = time.perf_counter()
                result = in_fresh_process(fn, {**spec, "work": work})
            runs[side].append(result)
            print(f"run {i + 1}/{args.runs} {side:8s} {time.perf_counter() - t0:6.1f}s  "
                  f"loss {' '.join(f'{x:.4f}' for x in result['loss'])}", flush=True)

    # The comparison means something only if both sides trained the same modules on the same tokens.
    m, p = runs["minivlm"][0], runs["peft"][0]
    assert m["quantized"] == p["quantized"], "the two sides quantized different modules"
    assert m["adapted"] == p["adapted"], "the two sides adapted different modules"
    assert m["trainable"] == p["trainable"], f"trainable parameters differ: {m['trainable']} vs {p['trainable']}"
    assert m["step_tokens"] == p["step_tokens"], "the two sides saw different batches"
    assert all(len(r["loss"]) == len(r["step_ends"]) == args.steps for side in runs.values() for r in side), \
        "a run logged or timed a different number of steps"

    mach = machine()
    date = datetime.date.today().isoformat()
    report = {"date": date, "machine": mach, "args": vars(args), "model": counts, "summary": summarize(runs, args),
              "runs": runs, "peft_loss_per_window_token": p["loss_per_window_token"]}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date}-{mach['name']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print("\n" + table + f"\nwritten: {stem}.json, {stem}.md")

    worst = max(report["summary"]["loss_rel_diff"])
    if worst > args.tolerance:
        print(f"FAIL: the loss curves differ by {worst:.2%} at some step (> {args.tolerance:.0%})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
