"""One real QLoRA training step of the demo model, printed section by section in the order of docs/qlora.md.

    python walkthrough.py [--config configs/demo.toml] [--set section.key=value ...]      (make walkthrough)

One function per section of docs/qlora.md, in its order (SECTIONS), each running the project's
own code (build, train_loader, answer_loss_sum, backward_window, build_optimizer,
save_checkpoint: what train.py and loop.train call) and printing its tensors' shapes, dtypes,
bytes and first values. Where bitsandbytes does the work (NF4, the 8-bit AdamW
step), the readable references in minivlm/reference/ redo it beside the library and the
walkthrough prints whether the two agree bit for bit. It follows a 4-bit PaliGemma config such as
the demo's; nothing is written outside a temporary directory. On the demo base (`make base data`
first) it takes about 6 s on 2 CPU cores. Like train.py, a script beside the library: it uses the
SFT objective (minivlm/objectives/sft.py), which the library modules never import.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
from dataclasses import dataclass, field
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set model.name_or_path=base/other")
    return ap.parse_args(argv)


# Run as a script, the arguments are read before the imports below (torch, transformers and
# bitsandbytes: seconds), so that --help and a mistyped option answer at once; main() reads them again.
if __name__ == "__main__":
    parse_args()

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from minivlm import plain_warnings  # noqa: E402
from minivlm.build import DTYPES, Built, build  # noqa: E402
from minivlm.checkpoint import rng_state, save_checkpoint, set_rng_state  # noqa: E402
from minivlm.config import Config, ConfigError, load_config, to_dict  # noqa: E402
from minivlm.batches import answer_positions  # noqa: E402
from minivlm.data import load_split  # noqa: E402
from minivlm.steps import total_steps, train_loader  # noqa: E402
from minivlm.load import float_weights  # noqa: E402
from minivlm.lora import DoRALinear, logical_numel  # noqa: E402
from minivlm.lora_init import loftq, nf4_roundtrip, olora, pissa  # noqa: E402
from minivlm.modules import matches  # noqa: E402
from minivlm.objectives.sft import answer_loss_sum, answer_tokens, backward_window  # noqa: E402
from minivlm.optim import build_optimizer, lr_at  # noqa: E402
from minivlm.precision import autocast, logits_of  # noqa: E402
from minivlm.reference import adam8bit, nf4  # noqa: E402

# The titles of docs/qlora.md's sections, in order; tests/test_walkthrough.py checks that the two agree.
STAGES = ["Config", "Load", "Quantize", "Inject", "Processor and label mask", "Forward with autocast",
          "Loss over answer tokens", "Backward", "Accumulation", "Clipping", "8-bit AdamW step", "Checkpoint"]


def stage(number: int, where: str) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\n§{number} {STAGES[number - 1]} — {where}    [peak RSS {rss:.0f} MiB]")


def size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1024 ** 2 else f"{nbytes / 1024 ** 2:.2f} MiB"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def describe(name: str, t: torch.Tensor, values: int = 4) -> None:
    """One line: name, shape, dtype, bytes, the first values."""
    head = t.detach().reshape(-1)[:values].tolist()
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in head)
    more = ", …" if t.numel() > values else ""
    print(f"  {name:<26} {str(tuple(t.shape)):<15} {str(t.dtype).removeprefix('torch.'):<8} "
          f"{size(nbytes(t)):>10}  [{shown}{more}]")


def quantized_bytes(p: bnb.nn.Params4bit) -> int:
    """A 4-bit weight's bytes: packed codes, its 8-bit scales and their own scale and offset."""
    state = p.quant_state
    parts = [p.data, state.absmax] + ([state.offset, state.state2.absmax] if state.nested else [])
    return sum(nbytes(t) for t in parts)


def float_weight(cfg: Config, built: Built, module_name: str) -> torch.Tensor:
    """The checkpoint's own tensor for `module_name`.weight, read by the names load.py streams by."""
    return float_weights(built.family.MODEL_CLASS, cfg.model.name_or_path, DTYPES[cfg.model.dtype])(module_name)


@dataclass
class Step:
    """The one training step the sections walk through: what each section leaves for the next."""
    cfg: Config
    out: Path  # where §12 saves
    facts: dict = field(default_factory=dict)  # what tests/test_walkthrough.py checks
    built: Built | None = None
    model: torch.nn.Module | None = None
    name: str = ""  # the adapted layer the sections look at: the first decoder layer's q_proj
    layer: bnb.nn.Linear4bit | None = None  # its 4-bit base
    adapter: torch.nn.Module | None = None  # its LoRALinear
    steps: int = 0  # the run's total steps (the schedule's length)
    window: list = field(default_factory=list)  # step 0's sample indices
    batch: dict = field(default_factory=dict)  # step 0's first micro-batch
    n_tokens: int = 0  # its answer tokens
    rng: dict = field(default_factory=dict)  # the RNG state §6, §7 and §8 start from: the same dropout masks
    vocab: int = 0
    scaler: torch.amp.GradScaler | None = None
    trainable: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def config(step: Step) -> None:
    """§1: The config's keys that decide the step."""
    cfg, t, lora = step.cfg, step.cfg.train, step.cfg.lora
    stage(1, "minivlm/config.py:load_config")
    print(f"  model   {cfg.model.name_or_path} ({cfg.model.family}), unquantized weights and matmuls in {cfg.model.dtype}")
    print(f"  quant   4-bit {cfg.quant.load_in_4bit}, {cfg.quant.quant_type}, double quantization {cfg.quant.double_quant}")
    scale = (f"alpha/√r = {lora.alpha / lora.r ** 0.5:g}, rsLoRA" if lora.use_rslora
             else f"alpha/r = {lora.alpha / lora.r:g}")
    print(f"  lora    r {lora.r}, alpha {lora.alpha} (scale {scale}), dropout {lora.dropout}")
    print(f"  train   batch {t.batch_size} × accumulation {t.grad_accum}, lr {t.lr:g} (warmup {t.warmup_steps}, "
          f"{t.schedule}), {t.optimizer}, max_grad_norm {t.max_grad_norm}, bf16 {t.bf16}, fp16 {t.fp16}")


def load(step: Step) -> None:
    """§2: The base model, loaded with its linears quantized as they are read."""
    cfg = step.cfg
    stage(2, "minivlm/build.py:build → minivlm/load.py:load_pretrained")
    start = time.perf_counter()
    built = build(cfg)
    model = built.model
    print(f"  built in {time.perf_counter() - start:.1f} s on {built.device}: the checkpoint read one tensor at a time, "
          f"each selected linear quantized as it arrived")
    print(f"  {'part':<38} {'values':>10} {'bytes':>10}  stored as")
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # the adapters: §4
            continue
        part = ".".join(name.split(".")[:3] if name.startswith("model.language_model") else name.split(".")[:2])
        groups.setdefault(part, []).append(p)
    for part, params in groups.items():
        values = sum(logical_numel(p) for p in params)
        stored = sum(quantized_bytes(p) if isinstance(p, bnb.nn.Params4bit) else nbytes(p) for p in params)
        kinds = sorted({"NF4" if isinstance(p, bnb.nn.Params4bit) else str(p.dtype).removeprefix("torch.") for p in params})
        print(f"  {part:<38} {values:>10,} {size(stored):>10}  {' + '.join(kinds)}")
    skip = built.family.QUANT_SKIP if cfg.quant.skip is None else cfg.quant.skip
    print(f"  {len(built.quantized)} linears in 4-bit; float, as quant.skip says: {', '.join(skip)}")
    step.built, step.model = built, model


def quantize(step: Step) -> None:
    """§3: One linear layer's NF4 weight, and the reference quantizer beside bitsandbytes'."""
    cfg, built, model, facts = step.cfg, step.built, step.model, step.facts
    stage(3, "minivlm/quant.py:quantize_into (bitsandbytes Params4bit); read: minivlm/reference/nf4.py:quantize_nf4")
    name = built.adapted[0]
    layer = model.get_submodule(name).base
    weight, state = layer.weight, layer.weight.quant_state
    w = float_weight(cfg, built, name)
    print(f"  {name}")
    describe("checkpoint weight W", w)
    describe("packed codes (2 per byte)", weight.data)
    describe(f"absmax{', 8-bit codes' if state.nested else ''}", state.absmax)
    if state.nested:
        describe("absmax's absmax", state.state2.absmax)
        describe("absmax's offset (mean)", state.offset)
    describe("NF4 code book", state.code, values=16)
    first = int(weight.data[0, 0])
    print(f"  first byte {first:#04x}: codes {first >> 4} and {first & 15} → NF4 values "
          f"{state.code[first >> 4]:.4f}, {state.code[first & 15]:.4f} × the first block's absmax")
    ours = nf4.quantize_nf4(w, double_quant=cfg.quant.double_quant)
    dequantized = bnb.functional.dequantize_4bit(weight.data, state)
    # (the reference's, bitsandbytes'): what tests/test_walkthrough.py checks against bitsandbytes itself
    facts["W"], facts["nf4"] = w, {
        "code book": (nf4.nf4_code_book(), state.code),
        "packed codes": (ours.packed, weight.data),
        "absmax": (ours.absmax, state.absmax),
        "dequantized W": (nf4.dequantize_nf4(ours), dequantized),
    }
    if state.nested:
        facts["nf4"].update({"offset": (ours.offset, state.offset),
                             "absmax's absmax": (ours.nested_absmax, state.state2.absmax)})
    print("  reference == bitsandbytes: " + ", ".join(f"{k} {torch.equal(*v)}" for k, v in facts["nf4"].items()))
    error = (dequantized - w).float()
    print(f"  {size(nbytes(w))} in {cfg.model.dtype} → {size(ours.nbytes())} "
          f"({8 * ours.nbytes() / w.numel():.3f} bits per value); |W − Ŵ| max {error.abs().max():.3g}, "
          f"RMS {error.pow(2).mean().sqrt():.3g} against RMS(W) {w.float().pow(2).mean().sqrt():.3g}")
    step.name, step.layer = name, layer


def inject(step: Step) -> None:
    """§4: The adapters beside the frozen 4-bit layers."""
    built, model, name, layer = step.built, step.model, step.name, step.layer
    stage(4, "minivlm/lora.py:inject_lora, minivlm/lora.py:LoRALinear")
    adapter = model.get_submodule(name)
    print(f"  {len(built.adapted)} LoRALinear layers; trainable {built.trainable_params:,} of {built.total_params:,} "
          f"values ({100 * built.trainable_params / built.total_params:.2f}%)")
    layer_prefix = name.rsplit(".", 2)[0]  # the first decoder layer: its seven adapters
    for sub in [n for n in built.adapted if n.startswith(layer_prefix + ".")]:
        m = model.get_submodule(sub)
        print(f"  {sub.removeprefix(layer_prefix + '.'):<18} W {m.out_features}×{m.in_features} NF4 frozen   "
              f"A {tuple(m.lora_A.shape)}  B {tuple(m.lora_B.shape)}  ({m.lora_A.numel() + m.lora_B.numel():,} trainable)")
    describe("lora_A (Kaiming uniform)", adapter.lora_A)
    describe("lora_B (zeros: ΔW = 0)", adapter.lora_B)
    print(f"  scaling alpha/r = {adapter.scaling:g}; the base weight requires grad: {layer.weight.requires_grad}")
    step.adapter = adapter
    with torch.random.fork_rng(devices=[]):  # the variants draw numbers; the step after them must not notice
        variants(step)


def substage(title: str, where: str) -> None:
    print(f"\n§4 · {title} — {where}")


@torch.no_grad()
def variants(step: Step) -> None:
    """§4's variants, each on the first decoder layer's q_proj (or, for the NF4 errors, on every
    adapted layer): what its flag changes, checked or measured here, not trained."""
    cfg, built, model, name, layer, facts = step.cfg, step.built, step.model, step.name, step.layer, step.facts
    r, alpha = cfg.lora.r, cfg.lora.alpha
    substage("rsLoRA", "minivlm/lora.py:LoRALinear (lora.use_rslora)")
    for rank in (r, 8 * r):
        print(f"  r {rank:>3}: alpha/r = {alpha / rank:<6.4g} alpha/√r = {alpha / rank ** 0.5:.4g}")
    substage("LoRA+", "minivlm/optim.py:build_optimizer (train.lora_plus_ratio)")
    plus = dataclasses.replace(cfg.train, lora_plus_ratio=16.0, optimizer="adamw")
    for group in build_optimizer(model, plus).param_groups:
        print(f"  {len(group['params']):>2} tensors at lr × {group['lr_scale']:g}")

    substage("DoRA", "minivlm/lora.py:DoRALinear (lora.use_dora)")
    dora = DoRALinear(layer, r, alpha)  # beside the same 4-bit W, not put in the model
    x = torch.randn(3, dora.in_features, generator=torch.Generator().manual_seed(0))
    describe("m = ‖W‖_c at init", dora.lora_magnitude)
    start = (dora(x) - layer(x)).abs().max().item()
    dora.lora_B.normal_(0, 0.02)
    direction = dora.base_weight().float() + dora.delta_weight()
    eq5 = x @ (dora.lora_magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)).T
    facts["dora"] = {"at init": start, "eq. 5": (dora(x) - eq5).abs().max().item()}
    print(f"  at init (B = 0) |DoRA(x) − W x| max {start:.3g}; with B ≠ 0, |DoRA(x) − m·(W + sBA)/‖W + sBA‖_c x| "
          f"max {facts['dora']['eq. 5']:.3g}")

    roundtrip = nf4_roundtrip(cfg.quant.quant_type, cfg.quant.double_quant, DTYPES[cfg.model.dtype])
    scaling = step.adapter.scaling
    errors: dict[str, list[float]] = {k: [] for k in ("QLoRA", "PiSSA", "OLoRA", "LoftQ T=1", "LoftQ T=2", "LoftQ T=5")}
    read = float_weights(built.family.MODEL_CLASS, cfg.model.name_or_path, DTYPES[cfg.model.dtype])
    for adapted in built.adapted:  # ‖W − (Q(W_res) + s·B₀A₀)‖ / ‖W‖: what the 4-bit model at step 0 has lost
        w = read(adapted).float()
        def lost(frozen: torch.Tensor, repair: torch.Tensor) -> float:
            return (torch.linalg.norm(w - roundtrip(frozen) - repair) / torch.linalg.norm(w)).item()
        errors["QLoRA"].append(lost(w, 0))
        for label, init in (("PiSSA", pissa), ("OLoRA", olora)):
            a, b = init(w, r, scaling)
            errors[label].append(lost(w - scaling * b @ a, scaling * b @ a))
        for t in (1, 2, 5):
            a, b, frozen = loftq(w, r, scaling, t, roundtrip)
            errors[f"LoftQ T={t}"].append(lost(frozen, scaling * b @ a))
    facts["init errors"] = means = {k: sum(v) / len(v) for k, v in errors.items()}
    for title, where, labels in (("PiSSA", "pissa", ["PiSSA"]), ("OLoRA", "olora", ["OLoRA"]),
                                 ("LoftQ", "loftq", ["LoftQ T=1", "LoftQ T=2", "LoftQ T=5"])):
        substage(title, f"minivlm/lora_init.py:{where} (lora.init = \"{where}\")")
        print(f"  what the 4-bit model at step 0 has lost of W, ‖W − (Q(W_res) + s·B₀A₀)‖ / ‖W‖, "
              f"the mean over {len(built.adapted)} adapted layers:")
        for label in ["QLoRA", *labels]:
            print(f"    {label:<10} {means[label]:.4f}  ({means[label] / means['QLoRA']:.2f} × QLoRA's, B = 0)")

    substage("LoRA on the vision tower", "minivlm/lora.py:inject_lora (lora.vision, lora.train_modules)")
    blocks = built.family.VISION_BLOCKS
    tower = [m for n, m in model.named_modules() if matches(n, blocks, anywhere=True) and type(m) is torch.nn.Linear]
    print(f"  lora.vision = true would add {len(tower)} adapters in {blocks} "
          f"({sum(r * (m.in_features + m.out_features) for m in tower):,} values, fp32) beside its "
          f"{str(tower[0].weight.dtype).removeprefix('torch.')} weights")


def processor_and_label_mask(step: Step) -> None:
    """§5: Step 0's micro-batch, as loop.train gets it, and which of its tokens carry loss."""
    cfg, t, built = step.cfg, step.cfg.train, step.built
    stage(5, "minivlm/steps.py:train_loader → minivlm/batches.py:collate → minivlm/models/paligemma.py:training_batch")
    ds = load_split(cfg.data, cfg.data.train_split)
    steps = total_steps(t, ds)
    # Step 0 exactly as loop.train gets it: the same loader, the same shuffled sample indices.
    first = next(iter(train_loader(ds, cfg.data, cfg.model.family, built.processor, t.batch_size, t.grad_accum,
                                   t.seed, 0, steps)))
    window, batches = first.window, first.batches
    batch = batches[0]
    print(f"  step 0's samples {window[0]}")
    for key, value in batch.items():
        describe(key, value)
    tokens = built.processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    labels = batch["labels"][0].tolist()
    image = sum(1 for tok in tokens if tok == built.processor.image_token)
    rest = list(zip(tokens, batch["token_type_ids"][0].tolist(), labels))[image:]
    print(f"  sample 0: {image} image tokens, then (token, token_type, label) — loss only where the label is kept:")
    print("    " + "  ".join(f"{tok!r}/{kind}/{'·' if lab == -100 else lab}" for tok, kind, lab in rest))
    n_tokens = answer_tokens(batch)
    print(f"  answer tokens that carry loss in this batch: {n_tokens} of {int(batch['attention_mask'].sum())} "
          "(image tokens, prompt and padding carry none)")
    step.steps, step.window, step.batch, step.n_tokens = steps, window, batch, n_tokens


def forward_with_autocast(step: Step) -> None:
    """§6: One forward: an adapter's input and output, and the logits at answer positions only."""
    cfg, t, built, model, name, layer, adapter, batch = step.cfg, step.cfg.train, step.built, step.model, step.name, step.layer, step.adapter, step.batch
    stage(6, "minivlm/precision.py:logits_of → minivlm/lora.py:LoRALinear.forward")
    model.train()  # as loop.train: dropout on
    seen = {}
    hook = adapter.register_forward_hook(lambda m, args, y: seen.update(x=args[0], y=y, base=m.base(args[0])))
    rng = rng_state()  # §7 and §8 redraw the same dropout masks
    with torch.no_grad():
        logits = logits_of(cfg, built, batch, at=answer_positions(batch))
    hook.remove()
    print(f"  precision.autocast for this config: {type(autocast(cfg, built.device)).__name__} "
          f"(train.bf16 {t.bf16}, train.fp16 {t.fp16}; model.dtype {cfg.model.dtype})")
    describe(f"{name.rsplit('.', 1)[1]} input x", seen["x"])
    describe("base(x): W dequantized", seen["base"])
    describe("base(x) + s·B·A·dropout(x)", seen["y"])
    print(f"  B = 0 at step 0, so the adapter adds exactly 0: {torch.equal(seen['y'], seen['base'])}")
    with torch.autocast(built.device.type, dtype=torch.bfloat16), torch.no_grad():
        low_rank = torch.nn.functional.linear(seen["x"][:1], adapter.lora_A)  # LoRALinear.forward's x·Aᵀ
    print(f"  under bf16 autocast x·Aᵀ would run in {str(low_rank.dtype).removeprefix('torch.')} while A stays a "
          f"{str(adapter.lora_A.dtype).removeprefix('torch.')} parameter (cast for the matmul only); the 4-bit base "
          f"computes in its compute_dtype, {str(layer.compute_dtype).removeprefix('torch.')}")
    vocab = logits.shape[-1]
    describe("logits at answer positions", logits)
    print(f"  full logits would be {tuple(batch['input_ids'].shape) + (vocab,)}: "
          f"{size(batch['input_ids'].numel() * vocab * logits.element_size())} instead of {size(nbytes(logits))}")
    step.rng, step.vocab = rng, vocab


def loss_over_answer_tokens(step: Step) -> None:
    """§7: The summed cross-entropy over answer tokens."""
    cfg, built, batch, n_tokens, rng, vocab, facts = step.cfg, step.built, step.batch, step.n_tokens, step.rng, step.vocab, step.facts
    stage(7, "minivlm/objectives/sft.py:answer_loss_sum → minivlm/logprobs.py:answer_log_probs")
    set_rng_state(rng)
    with torch.no_grad():
        loss_sum = answer_loss_sum(cfg, built, batch)
    facts["loss_per_token"] = loss_sum.item() / n_tokens
    print(f"  Σ −log p(answer token) = {loss_sum.item():.4f} over {n_tokens} tokens: {facts['loss_per_token']:.4f} per token "
          f"(uniform guessing over {vocab} tokens: ln {vocab} = {torch.log(torch.tensor(float(vocab))):.4f})")
    chunk = cfg.train.logits_chunk
    print(f"  train.logits_chunk = {chunk}: the lm_head ran on the {n_tokens} answer rows in "
          f"{-(-n_tokens // chunk) if chunk else 1} chunk(s), each recomputed in backward instead of kept")


def backward(step: Step) -> None:
    """§8: backward_window on §7's micro-batch: the loss per token and the adapters' first gradients."""
    cfg, t, built, model, batch, rng, facts = step.cfg, step.cfg.train, step.built, step.model, step.batch, step.rng, step.facts
    name, layer, adapter = step.name, step.layer, step.adapter
    stage(8, "minivlm/objectives/sft.py:backward_window")
    set_rng_state(rng)
    scaler = torch.amp.GradScaler(built.device.type, enabled=t.fp16)
    window_loss, _, _ = backward_window(cfg, built, model, [batch], scaler)  # §7's micro-batch
    facts["backward_loss_per_token"] = window_loss
    print(f"  loss per token {window_loss:.4f} (§7's, same dropout masks: {abs(window_loss - facts['loss_per_token']) < 1e-6})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    describe(f"{name.rsplit('.', 1)[1]}.lora_B.grad", adapter.lora_B.grad)
    describe(f"{name.rsplit('.', 1)[1]}.lora_A.grad", adapter.lora_A.grad)
    print("  ∂L/∂A = s·Bᵀ·(∂L/∂y)·xᵀ is 0 while B = 0: the first step moves B alone")
    print(f"  the NF4 weight: grad {layer.weight.grad}; yet this first layer's B got a gradient, through the "
          f"dequantized W of every layer above it")
    step.scaler, step.trainable = scaler, trainable


def accumulation(step: Step) -> None:
    """§9: The same batch as micro-batches of one sample: the same gradient, and a mean of means that is not."""
    cfg, built, model, batch, window, n_tokens = step.cfg, step.built, step.model, step.batch, step.window, step.n_tokens
    scaler, trainable, facts = step.scaler, step.trainable, step.facts
    stage(9, f"minivlm/objectives/sft.py:backward_window (one sample per micro-batch: batch 1 × grad_accum {len(window[0])})")
    # Compare gradients without dropout: its masks depend on how the batch is cut.
    kept = [p.grad.clone() for p in trainable]
    model.eval()
    micro = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    one = _grads(model, trainable, lambda: backward_window(cfg, built, model, [batch], scaler))
    accumulated = _grads(model, trainable, lambda: backward_window(cfg, built, model, micro, scaler))

    def mean_of_means():  # the classic bug: each micro-batch's own mean, averaged
        for sample in micro:
            (answer_loss_sum(cfg, built, sample) / answer_tokens(sample) / len(micro)).backward()
    bug = _grads(model, trainable, mean_of_means)
    facts["accumulation_error"] = _relative(accumulated, one)
    facts["mean_of_means_error"] = _relative(bug, one)
    print(f"  answer tokens per micro-batch {[answer_tokens(m) for m in micro]}: each micro-batch's loss sum is "
          f"divided by the window's {n_tokens}")
    print(f"  ‖g({len(micro)} micro-batches) − g(1 batch)‖ / ‖g‖ = {facts['accumulation_error']:.1e}   (float rounding)")
    print(f"  mean of per-micro-batch means instead:   {facts['mean_of_means_error']:.1e}   (short answers over-weighted)")
    model.train()
    for p, g in zip(trainable, kept):
        p.grad = g


def clipping(step: Step) -> None:
    """§10: Gradient clipping."""
    t, trainable = step.cfg.train, step.trainable
    stage(10, "minivlm/loop.py:train (torch.nn.utils.clip_grad_norm_)")
    norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
    after = torch.nn.utils.get_total_norm([p.grad for p in trainable])
    print(f"  ‖g‖ over {len(trainable)} tensors: {norm:.4f} → {after:.4f} (max_grad_norm {t.max_grad_norm}: "
          f"{'scaled down' if norm > t.max_grad_norm > 0 else 'unchanged'})")


def adamw_8bit_step(step: Step) -> None:
    """§11: One 8-bit AdamW step, and the reference step beside bitsandbytes'."""
    t, model, trainable, steps, facts = step.cfg.train, step.model, step.trainable, step.steps, step.facts
    stage(11, "minivlm/optim.py:build_optimizer, minivlm/optim.py:lr_at; read: minivlm/reference/adam8bit.py:adamw8bit_step")
    optimizer = build_optimizer(model, t)
    lr = lr_at(0, steps, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    warmup = f"warmup step 1 of {t.warmup_steps}: lr·1/{t.warmup_steps + 1}" if t.warmup_steps else t.schedule
    print(f"  {type(optimizer).__name__}; lr at step 0: {lr:.3g} ({warmup})")
    names = {p: n for n, p in model.named_parameters()}
    probe = max(trainable, key=torch.Tensor.numel)  # the largest tensors are the likeliest to get 8-bit state
    before = (probe.detach().clone(), probe.grad.clone())
    optimizer.step()
    state = optimizer.state[probe]
    eight_bit = sum(optimizer.state[p]["state1"].dtype == torch.uint8 for p in trainable)
    print(f"  8-bit state for {eight_bit} of {len(trainable)} tensors; tensors under {optimizer.args.min_8bit_size} "
          "values (bitsandbytes' min_8bit_size) keep fp32 Adam")
    state_bytes = sum(nbytes(v) for st in optimizer.state.values() for k, v in st.items()
                      if k in ("state1", "state2", "absmax1", "absmax2"))
    print(f"  optimizer state {size(state_bytes)}; fp32 Adam would keep {size(8 * sum(p.numel() for p in trainable))}")
    print(f"  {names[probe]}:")
    for key, meaning in [("state1", "m"), ("absmax1", "m's absmax"), ("state2", "v"), ("absmax2", "v's absmax")]:
        describe(f"{key} ({meaning})", state[key])
    if state["state1"].dtype == torch.uint8:
        group = optimizer.param_groups[0]
        param, ref = before[0].clone(), adam8bit.init_state(before[0])
        adam8bit.adamw8bit_step(param, before[1], ref, lr, group["betas"], group["eps"], group["weight_decay"])
        facts["adam_step"] = {"parameter": before[0], "gradient": before[1], "lr": lr, "betas": group["betas"],
                              "eps": group["eps"], "weight_decay": group["weight_decay"]}
        facts["adam"] = {"parameter": (param, probe.detach()), "m codes": (ref.m_codes, state["state1"]),
                         "m absmax": (ref.m_absmax, state["absmax1"]), "v codes": (ref.v_codes, state["state2"]),
                         "v absmax": (ref.v_absmax, state["absmax2"])}
        print("  reference == bitsandbytes: " + ", ".join(f"{k} {torch.equal(*v)}" for k, v in facts["adam"].items()))
    moved = (probe.detach() - before[0]).abs()
    print(f"  |Δθ| max {moved.max():.3g} (Adam's first step moves each value by about lr, since m̂/√v̂ = ±1)")
    optimizer.zero_grad(set_to_none=True)
    step.optimizer = optimizer


def checkpoint(step: Step) -> None:
    """§12: The save: the adapters and the training state."""
    cfg, model, optimizer, scaler, out, facts = step.cfg, step.model, step.optimizer, step.scaler, step.out, step.facts
    stage(12, "minivlm/checkpoint.py:save_checkpoint")
    saved = save_checkpoint(out, model, optimizer, scaler, 1, to_dict(cfg), {})
    for file in sorted(saved.iterdir()):
        print(f"  {file.relative_to(out)!s:<50} {size(file.stat().st_size):>10}")
    print("  the adapters and the optimizer's 8-bit state; not the 4-bit base: it is the checkpoint you started from")
    facts["checkpoint"] = sorted(f.name for f in saved.iterdir())


SECTIONS = [config, load, quantize, inject, processor_and_label_mask, forward_with_autocast, loss_over_answer_tokens,
            backward, accumulation, clipping, adamw_8bit_step, checkpoint]


def walk(cfg: Config, out: Path) -> dict:
    """Run the sections in order; returns what tests/test_walkthrough.py checks: each pair of tensors
    compared (the reference's, bitsandbytes'), the inputs they came from, the losses and errors measured."""
    step = Step(cfg, out)
    for section in SECTIONS:
        section(step)
    return step.facts


def _grads(model: torch.nn.Module, trainable: list[torch.Tensor], backward) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    backward()
    return [p.grad.clone() for p in trainable]


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together, as clip_grad_norm_ measures a gradient."""
    norm = torch.nn.utils.get_total_norm
    return float(norm([x - y for x, y in zip(a, b)]) / norm(b))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plain_warnings()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if (cfg.model.family != "paligemma" or not cfg.quant.load_in_4bit or cfg.train.optimizer == "adamw"
            or cfg.train.fp16):
        # §3 reads a 4-bit layer, §5 PaliGemma's token types, §11 the 8-bit optimizer's state; §10
        # and §11 clip and step without fp16's GradScaler.
        sys.exit("error: the walkthrough follows a 4-bit PaliGemma config with an 8-bit optimizer and no fp16, "
                 f"such as configs/demo.toml; this one has model.family = {cfg.model.family!r}, quant.load_in_4bit "
                 f"= {cfg.quant.load_in_4bit}, train.optimizer = {cfg.train.optimizer!r}, train.fp16 = {cfg.train.fp16}")
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as out:
        return walk(cfg, Path(out))


if __name__ == "__main__":
    main()
