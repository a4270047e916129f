"""The memory plan: where a QLoRA run's GPU memory goes, computed before any weight is read.

    python train.py --config configs/<recipe>.toml --dry-run [--gpu-memory 24GiB]

The model is built on PyTorch's "meta" device from the checkpoint's config.json alone: every
tensor has a shape and a dtype but no storage, so a 9B model costs nothing and takes a second.
Counting its parameters module by module, with the same rules build.py applies (which linears
become 4-bit, which get adapters, which train in full), gives every term below. n = parameter
count, b = bytes of the model dtype (2 for bf16/fp16, 4 for fp32).

Weights (resident for the whole run)
  4-bit linears    NF4 packs two weights per byte: 0.5 byte/param. Each block of 64 weights has
                   one absmax scale. Without double quantization it is fp32: 4/64 = 0.0625
                   byte/param (0.5 bit). With double quantization the scales are themselves
                   quantized to 8 bits: 1/64 byte/param, plus one fp32 second-level absmax per
                   256 blocks (4/16384), plus per layer a 256-entry fp32 code book (1 KiB), the
                   16-entry NF4 code (64 B) and an fp32 offset. ≈ 0.516 byte/param in all, against
                   2 in bf16: the QLoRA saving. Biases of quantized linears stay in b bytes.
  float modules    everything else (vision tower, projector, embeddings, lm_head, norms): n · b.
                   Tied weights (PaliGemma's lm_head = embed_tokens) are counted once.
Training state (only for what trains: LoRA's A and B, and lora.train_modules)
  LoRA adapters    A (r × in) and B (out × r) per targeted linear, fp32: 4 bytes/param; with
                   DoRA (lora.use_dora) also its magnitude m (out).
  train_modules    cast to fp32 (master weights): 4 bytes/param instead of b.
  gradients        one fp32 gradient per trainable param: 4 bytes/param.
  optimizer        adamw: two fp32 moments, 8 bytes/param. adamw_8bit / paged_adamw_8bit: two
                   8-bit moments (2 bytes/param) + one fp32 absmax per 256-value block and moment
                   (8/256 byte/param); bitsandbytes keeps tensors under 4096 values in 32-bit
                   state (8 bytes/param). The frozen base has no gradient and no optimizer state:
                   that is why QLoRA's training state is megabytes, not gigabytes.
Activations (per step, for batch B × data.max_length tokens T: the worst case the data allows)
  Tensors the forward pass keeps for backward, per token and decoder layer, e = b bytes:
    norms          RMSNorm upcasts to fp32 and keeps that copy: 4·h per norm (2 norms/layer);
                   Phi's LayerNorm keeps its input: e·h.
    attention      the q/k/v input (e·h), q, k, v and the output kept by the fused attention
                   kernel, and o_proj's input: 5·e·q (q = heads × head_dim; transformers repeats
                   grouped k/v heads to the query head count before the kernel). Flash /
                   memory-efficient attention keeps no T×T matrix, only a log-sum-exp per head.
    MLP            its input (e·h) and, for gated MLPs (Gemma, Llama, Mistral), the gate output,
                   the activation, the up output and their product: 4·e·i. Phi's gelu_new is
                   written as 5 elementwise ops and keeps 5·e·i.
    LoRA           nothing extra without dropout (A reads the tensor the base layer keeps anyway).
                   With dropout each adapter keeps its mask (1 byte) and dropped copy (e) of its
                   input; with lora.shared_dropout, once per distinct input. DoRA keeps two
                   (tokens × out) tensors per adapter for m's and B's gradients, the base output
                   Wx and the adapter output BAx: 2·e·out. Its weight norm ‖W + s·BA‖ holds,
                   for a moment, W dequantized, in fp32, and s·BA in fp32 (the largest adapted
                   layer's: 4 + 4 bytes/param more in the workspace).
  IDEFICS's gated cross-attention blocks (one every cross_layer_interval layers) are counted as
  one more decoder layer each. Llama 3.2 Vision's cross-attention layers are among its decoder
  layers, and read V vision positions a sample (tiles × patches): the projected states (e·h
  each) and the T × V mask (e) once, every such layer's keys and values (2·e·kv each) and its
  k_norm's fp32 copy of the keys (4·kv); one layer's when checkpointed. Tokens with no
  trainable parameter upstream keep nothing (the frozen vision tower: only a transient
  one-layer peak while it runs), so that is left out.
  With gradient checkpointing each layer keeps only its input (e·h per token) and one layer is
  recomputed at a time in backward: L·e·h + one layer's full set.
  Logits: minivlm runs the lm_head at labelled (answer) positions only, so the vocabulary-sized
  term is (B × answer tokens) × V, not B·T·V: the log-softmax keeps fp32 log-probabilities
  (4 bytes) and backward holds their fp32 gradient and the result (8 more): 12·A·V. With
  train.logits_chunk = c (logprobs.py) nothing vocabulary-sized is kept: the same 12 bytes a
  row, for min(A, c) rows at a time, alive only while a chunk runs.
  Also counted: the T×T attention mask (1 byte, once), the final norm, the largest 4-bit weight
  dequantized for its matmul (bitsandbytes dequantizes per layer, per call), and the gradient
  flowing back through the hidden states (3 · e·h per token).
Sampling (GRPO): generate keeps, for its B = batch × num_generations rows, every layer's keys and
values of the prompt and the completion so far, without gradient: 2·e·kv per token and layer
(kv = key/value heads × head_dim) at full length T. It runs before the training forward, whose
activations are not yet alive, so the peak is the larger of the two, as for the vision transient.
Fixed: the CUDA context (≈0.5 GiB, not visible to torch.cuda.memory_allocated but on the card).

Host RAM to load: build() streams the checkpoint (minivlm/load.py), one tensor at a time onto
the GPU: the largest single tensor in float + ≈2 GiB of Python/torch/CUDA runtime. Loading the
whole float model first, as from_pretrained-then-quantize does (and LLaVA-Phi, assembled from
two checkpoints, still does), needs n_total · b: printed for comparison. On a CPU device the
model itself lives in host RAM too: add the weights above.

Assumptions, stated so they can be checked: activations are for a full-length batch (every
sample at data.max_length); attention runs in a fused kernel (sdpa on a GPU); the answer length
is a parameter (32 tokens/sample by default); allocator fragmentation is not modelled (leave a
few percent spare). tests/test_plan.py checks the weight, adapter and optimizer terms against a
real built model to the byte and the activation term against the tensors autograd actually saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn

from minivlm import packing
from minivlm.batches import check_images, check_video
from minivlm.build import DTYPES, check_model_source, is_hub_id
from minivlm.config import Config, ConfigError
from minivlm.distributed import layer_class_names
from minivlm.logprobs import logits_chunk
from minivlm.models import Layout, get_family, per_sample, processor
from minivlm.modules import matches

GiB = 1024 ** 3
BNB_BLOCK = 64  # weights per NF4 absmax block
BNB_BLOCK2 = 256  # absmax values per second-level block (double quant)
OPTIM_BLOCK = 256  # values per 8-bit optimizer-state block
OPTIM_MIN_8BIT = 4096  # bitsandbytes keeps smaller tensors' optimizer state in 32 bits
CUDA_CONTEXT = int(0.5 * GiB)
HOST_RUNTIME = 2 * GiB
# The config.json of the seed recipes' models (configs/real/README.md), where the repository is
# checked out beside this package; an installed package has none, and so no copies to plan from.
REAL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "real"


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit weight with its quantization state (bnb 0.4x-0.5x layout)."""
    blocks = math.ceil(numel / BNB_BLOCK)
    packed = math.ceil(numel / 2) + 16 * 4  # two codes per byte + the 16-entry NF4 code book
    if double_quant:  # uint8 absmax, fp32 absmax of the absmax, 256-entry code book, fp32 offset
        return packed + blocks + 4 * math.ceil(blocks / BNB_BLOCK2) + 256 * 4 + 4
    return packed + 4 * blocks


def optimizer_bytes(numel: int, optimizer: str) -> int:
    """Optimizer state for one trainable tensor of `numel` values."""
    if optimizer == "adamw" or numel < OPTIM_MIN_8BIT:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / OPTIM_BLOCK)


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '24576MiB' -> bytes (GB and G read as GiB, as nvidia-smi does)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 24GiB or 80GB")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


@dataclass
class Plan:
    model: str
    quantized: int = 0  # number of 4-bit linears
    quant_params: int = 0
    quant_bytes: int = 0
    float_params: int = 0
    float_bytes: int = 0
    adapted: int = 0  # number of LoRA-wrapped linears
    lora_params: int = 0
    full_params: int = 0  # lora.train_modules, trained in full
    trainable_bytes: int = 0  # fp32 adapters + train_modules
    grad_bytes: int = 0
    optim_bytes: int = 0
    act_ckpt: int = 0  # activations with gradient checkpointing
    act_full: int = 0  # ... without
    act_saved: int = 0  # of act_full, the tensors kept for backward (the rest is backward workspace)
    logits_bytes: int = 0
    logits_chunk: int = 0  # answer rows through the lm_head at a time; 0 = all
    vision_transient: int = 0  # the frozen vision tower's one-layer peak while it runs
    sampling: int = 0  # GRPO: generate's KV cache for the sampled rows
    gradient_checkpointing: bool = False
    host_streamed: int = 0
    host_full: int = 0
    ranks: int = 1  # processes under torchrun
    fsdp: bool = False  # train.fsdp: the layers sharded across the ranks
    layer_bytes: int = 0  # weights inside the transformer layers (what FSDP shards)
    largest_layer: int = 0  # ... of the largest one
    largest_adapted: int = 0  # in × out of the largest adapted linear
    notes: list[str] = field(default_factory=list)
    tokens: str = ""  # how the sequence length and image tokens were counted
    config_note: str = ""  # says so where a copy of the config stood in (planning_source)

    @property
    def weights(self) -> int:
        """Per GPU. Replicated (one process, or DDP): all of them. FSDP: each rank's 1/N of the
        layers, the rest whole, and two layers gathered whole at a time (the one running and
        the next, which FSDP prefetches; limit_all_gathers caps it there)."""
        whole = self.quant_bytes + self.float_bytes
        if not (self.fsdp and self.ranks > 1):
            return whole
        return whole - self.layer_bytes + self.layer_bytes // self.ranks + 2 * self.largest_layer

    @property
    def training_state(self) -> int:
        return self.trainable_bytes + self.grad_bytes + self.optim_bytes

    def total(self, checkpointing: bool | None = None) -> int:
        ckpt = self.gradient_checkpointing if checkpointing is None else checkpointing
        act = self.act_ckpt if ckpt else self.act_full
        return self.weights + self.training_state + max(act, self.vision_transient, self.sampling) + CUDA_CONTEXT


# ---------------------------------------------------------------------------------------------
# The model on the meta device


def planning_source(name_or_path: str) -> tuple[str, str]:
    """Where the planner reads model.name_or_path's config.json: a local directory as it is; a hub
    id's files in the Hugging Face cache (its snapshot directory, so no request goes out to ask if
    they are current); else its copy in configs/real/, by the id's last part
    (google/paligemma-3b-pt-224 -> configs/real/paligemma-3b-pt-224), also without a request; else
    the hub. Returns (directory or hub id, "" or a note saying a copy stands in)."""
    if not is_hub_id(name_or_path):
        return name_or_path, ""
    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent), ""
    copy = REAL_CONFIGS / name_or_path.rpartition("/")[2]
    if not copy.is_dir():
        return name_or_path, ""
    shown = copy.relative_to(Path.cwd()) if copy.is_relative_to(Path.cwd()) else copy
    return str(copy), f"planning from {shown}/, a copy of {name_or_path}'s config (no download)"


def meta_model(cfg: Config, family: ModuleType, source: str) -> nn.Module:
    """The family's model with every tensor on the meta device, from the config.json at `source`
    (planning_source) only."""
    elsewhere = "configs/real/ holds the config.json of the seed recipes' models"
    try:
        check_model_source(source)  # a mistyped path, or a hub id out of reach: said at once
    except ConfigError as e:
        raise ConfigError(f"{e} ({elsewhere})") from None
    try:
        with torch.device("meta"):
            return family.skeleton(source, DTYPES[cfg.model.dtype])
    except OSError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ConfigError(f"--dry-run reads only config.json, and cannot for model.name_or_path = "
                          f"{cfg.model.name_or_path!r}: {first_line}; point it at a directory with the checkpoint's "
                          f"config.json ({elsewhere})") from None


# ---------------------------------------------------------------------------------------------
# Weights and training state: counted module by module


def _weight_terms(plan: Plan, model: nn.Module, cfg: Config, family: ModuleType) -> tuple[int, int]:
    """Fill the weight and training-state terms; return (largest 4-bit weight numel, largest tensor bytes)."""
    b = DTYPES[cfg.model.dtype].itemsize
    quant_skip = family.QUANT_SKIP if cfg.quant.skip is None else cfg.quant.skip
    targets = family.LORA_TARGETS if cfg.lora.targets is None else cfg.lora.targets
    lora_skip = family.LORA_SKIP if cfg.lora.skip is None else cfg.lora.skip
    # The same selections as quant.quantize_linears and lora.inject_lora.
    quantized = {name for name, m in model.named_modules()
                 if cfg.quant.load_in_4bit and type(m) is nn.Linear
                 and not any(matches(name, s, anywhere=True) for s in quant_skip)}
    vision = family.VISION_BLOCKS if cfg.lora.vision else None
    adapted = [m for name, m in model.named_modules()
               if vision and matches(name, vision, anywhere=True) and type(m) is nn.Linear
               or isinstance(m, nn.Linear) and any(matches(name, p, anywhere=False) for p in targets)
               and not any(matches(name, s, anywhere=True) for s in lora_skip)]
    full = {id(p) for name, m in model.named_modules() for p in m.parameters()
            if any(matches(name, pat, anywhere=False) for pat in cfg.lora.train_modules)}
    quant_ids = {id(model.get_submodule(n).weight) for n in quantized}
    trainable_numels = [m.in_features * cfg.lora.r for m in adapted] + [m.out_features * cfg.lora.r for m in adapted]
    trainable_numels += [m.out_features for m in adapted] if cfg.lora.use_dora else []  # DoRA's m
    largest_q = largest = 0
    for p in list(model.parameters()) + list(model.buffers()):  # parameters() yields tied weights once
        largest = max(largest, p.numel() * b)
        if id(p) in quant_ids:
            plan.quant_params += p.numel()
            plan.quant_bytes += nf4_bytes(p.numel(), cfg.quant.double_quant)
            largest_q = max(largest_q, p.numel())
        elif id(p) in full:
            plan.full_params += p.numel()
            trainable_numels.append(p.numel())
        else:
            plan.float_params += p.numel()
            plan.float_bytes += p.numel() * p.element_size()
    plan.quantized, plan.adapted = len(quantized), len(adapted)
    plan.lora_params = sum(m.in_features + m.out_features for m in adapted) * cfg.lora.r
    plan.lora_params += sum(m.out_features for m in adapted) * cfg.lora.use_dora
    plan.largest_adapted = max((m.in_features * m.out_features for m in adapted), default=0)
    plan.trainable_bytes = 4 * (plan.lora_params + plan.full_params)
    plan.grad_bytes = 4 * (plan.lora_params + plan.full_params)
    plan.optim_bytes = sum(optimizer_bytes(n, cfg.train.optimizer) for n in trainable_numels)
    plan.host_full = (plan.quant_params + plan.float_params + plan.full_params) * b + HOST_RUNTIME
    plan.host_streamed = largest + HOST_RUNTIME
    # What FSDP shards: the outermost modules of the classes distributed._shard wraps.
    layer_classes, outer = layer_class_names(model), []
    for name, m in model.named_modules():
        if type(m).__name__ in layer_classes and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
            size = sum(nf4_bytes(p.numel(), cfg.quant.double_quant) if id(p) in quant_ids
                       else p.numel() * p.element_size() for p in m.parameters() if id(p) not in full)
            plan.layer_bytes += size
            plan.largest_layer = max(plan.largest_layer, size)
    return largest_q, largest


# ---------------------------------------------------------------------------------------------
# Activations


def _preprocessor(path: str) -> dict:
    """The image processor's settings as a call uses them: preprocessor_config.json (hub
    checkpoints) or the "image_processor" of processor_config.json (what transformers 5 writes),
    under the processor class's call-time defaults (processor.call_settings); {} if neither."""
    single, joint = Path(path) / "preprocessor_config.json", Path(path) / "processor_config.json"
    outer = json.loads(joint.read_text()) if joint.is_file() else {}
    saved = json.loads(single.read_text()) if single.is_file() else outer.get("image_processor", {})
    if not saved:
        return {}
    return processor.call_settings(saved, saved.get("processor_class") or outer.get("processor_class"))


def _attention_widths(tc) -> tuple[int, int]:
    """(q, kv): the widths of the queries and of the keys (or values), heads × head_dim. A decoder
    without grouped-query attention (IDEFICS's LLaMA) has no num_key_value_heads: as many as queries."""
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return heads * head_dim, getattr(tc, "num_key_value_heads", heads) * head_dim


def _per_token_layer_bytes(tc, e: int, cfg: Config) -> int:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    h, i, heads = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads
    q, kv = _attention_widths(tc)
    # (the tensor each adapter reads, its width), in q, k, v, o, (gate,) up, down order; and the
    # width each writes.
    if tc.model_type == "phi":  # one LayerNorm, attention and MLP in parallel on its output
        norms, mlp = e * h + 8, 5 * e * i
        adapter_inputs = [("norm", h)] * 3 + [("attention", q), ("norm", h), ("mlp", i)]
        outputs = [q, kv, kv, h, i, h]
    else:
        norms, mlp = 2 * (4 * h + 4), e * h + 4 * e * i
        adapter_inputs = [("attention norm", h)] * 3 + [("attention", q)] + [("mlp norm", h)] * 2 + [("mlp", i)]
        outputs = [q, kv, kv, h, i, i, h]
    attention = e * h + 5 * e * q + 4 * heads
    targets = cfg.lora.targets or []
    n = len(adapter_inputs) if not targets else min(len(targets), len(adapter_inputs))
    lora = 0
    if cfg.lora.dropout > 0:  # mask (1 byte) + dropped copy (e) per adapter input
        inputs = adapter_inputs[:n]
        if cfg.lora.shared_dropout:  # one mask per tensor read: q/k/v share one, gate/up one
            inputs = list(dict(inputs).items())
        lora = sum(width for _, width in inputs) * (1 + e)
    if cfg.lora.use_dora:  # Wx and BAx, kept for m's and B's gradients
        lora += 2 * e * sum(outputs[:n])
    return norms + attention + mlp + lora


def _activation_terms(plan: Plan, layout: Layout, cfg: Config, largest_q: int, answer_tokens: int,
                      rows_per_sample: int, sampled: bool) -> None:
    tc, e = layout.text, DTYPES[cfg.model.dtype].itemsize
    B, T = cfg.train.batch_size * rows_per_sample, cfg.data.max_length
    images, patches = layout.images, layout.patches
    layers = tc.num_hidden_layers + layout.cross_attention_layers
    per_layer = _per_token_layer_bytes(tc, e, cfg)
    tokens = B * T
    answers = B * answer_tokens
    chunk = logits_chunk(cfg)
    logit_rows = min(answers, chunk) if chunk else answers
    kept_rows = 0 if chunk else answers  # rows of fp32 log-probabilities kept for backward
    plan.logits_bytes = 12 * logit_rows * tc.vocab_size
    plan.logits_chunk = chunk
    layer_saves = layers * tokens * per_layer
    # Kept for backward (without checkpointing): what saved_tensors_hooks sees in tests/test_plan.py.
    plan.act_saved = (layer_saves
                      + B * T * T  # the bool T×T attention mask
                      + tokens * 4 * tc.hidden_size  # the final norm's fp32 copy
                      + answers * e * tc.hidden_size  # lm_head input at answer positions
                      + 4 * kept_rows * tc.vocab_size)  # fp32 log-probabilities
    plan.act_saved += B * images * patches * e * layout.connector_saved_width
    # Cross-attention to vision states: the projected states and the text × vision mask once, and
    # each reading layer's keys and values, with k_norm's fp32 copy of the keys (under
    # checkpointing, one layer's at a time).
    kv = _attention_widths(tc)[1]
    cross_kv = 0  # one reading layer's keys and values
    if layout.vision_states:
        cross_kv = B * layout.vision_states * (2 * e * kv + 4 * kv)
        plan.act_saved += (B * layout.vision_states * e * (tc.hidden_size + T)
                           + layout.vision_state_readers * cross_kv)
    # Alive only for a moment in backward, on top of what is saved: the log-probabilities' fp32
    # gradient and its input (8 bytes a row), and chunked, the chunk's recomputed logits (4 more).
    workspace = (tokens * 3 * e * tc.hidden_size  # gradients of the hidden states
                 + largest_q * e  # one dequantized 4-bit weight
                 + 8 * plan.largest_adapted * cfg.lora.use_dora  # DoRA's norm: W and s·BA in fp32
                 + (12 * logit_rows - 4 * kept_rows) * tc.vocab_size)
    plan.act_full = plan.act_saved + workspace
    plan.act_ckpt = (plan.act_full - layer_saves + layers * tokens * e * tc.hidden_size + tokens * per_layer
                     - max(layout.vision_state_readers - 1, 0) * cross_kv)
    plan.vision_transient = B * (images * patches + layout.video_patches) * e * (
        (4 + layout.vision_hidden_states) * layout.vision_width + 2 * layout.vision_intermediate)
    if sampled:
        plan.sampling = tokens * tc.num_hidden_layers * 2 * e * kv
    plan.tokens = (f"batch {B} × max_length {T} tokens, {layout.how}; logits at {answer_tokens} answer tokens/sample "
                   f"× vocab {tc.vocab_size}")


def plan_memory(cfg: Config, answer_tokens: int = 32, ranks: int = 1, rows_per_sample: int = 1,
                sampled: bool = False) -> Plan:
    """The memory plan per GPU for training `cfg` on `ranks` processes: meta-device model, no
    weights read, nothing allocated. The objective's `planned` says the rest: `rows_per_sample`,
    the rows one sample puts through the forward (DPO's chosen and rejected; GRPO's completions),
    `answer_tokens` a row's loss is taken on, and whether its rows are `sampled` first (GRPO)."""
    family = get_family(cfg.model.family)
    source, note = planning_source(cfg.model.name_or_path)
    model = meta_model(cfg, family, source)
    plan = Plan(model=cfg.model.name_or_path, gradient_checkpointing=cfg.train.gradient_checkpointing,
                ranks=ranks, fsdp=cfg.train.fsdp, config_note=note)
    largest_q, _ = _weight_terms(plan, model, cfg, family)
    # The checkpoint's preprocessor_config.json, with model.processor's resolution keys on top: the
    # image processor the run builds (models/processor.py).
    check_images(family, cfg.data.max_images, "data.max_images is")
    check_video(family, cfg)
    packing.check(family, cfg)
    preprocessor = _preprocessor(source)
    layout = per_sample(family.layout(model, {**preprocessor, **cfg.model.processor}), cfg.data.max_images)
    if cfg.data.video_column:
        # The video processor's settings as the run builds it: the images', the checkpoint's video
        # config over them, model.video_processor's keys over both (models/processor.py).
        video = {**preprocessor, **processor.saved_video_config(source), **cfg.model.video_processor}
        tokens, patches, how = family.video_tokens(model, video, cfg.data.video_frames)
        layout = dataclasses.replace(layout, image_tokens=layout.image_tokens + tokens, video_patches=patches,
                                     how=f"{layout.how}; {how}")
    _activation_terms(plan, layout, cfg, largest_q, answer_tokens, rows_per_sample, sampled)
    if layout.image_tokens >= cfg.data.max_length:
        fewer = f" or lower model.processor's {' / '.join(family.RESOLUTION)}" if family.RESOLUTION else ""
        plan.notes.append(f"data.max_length {cfg.data.max_length} leaves no room for text after {layout.image_tokens} "
                          f"image tokens: such samples are dropped; raise data.max_length{fewer}")
    if not cfg.quant.load_in_4bit:
        plan.notes.append("quant.load_in_4bit is off: every weight is counted in float")
    if cfg.lora.vision:  # its adapters and their training state are counted above; its activations are not
        plan.notes.append(f"lora.vision: what each layer of {family.VISION_BLOCKS} keeps for its adapters' gradients "
                          "is not counted (the vision activations above are one layer's, as for a frozen tower)")
    return plan


def gib(n: int) -> str:
    return f"{n / GiB:6.2f} GiB"


def format_plan(plan: Plan, gpu_memory: int | None = None) -> str:
    ck = "on" if plan.gradient_checkpointing else "off"
    per = "" if plan.ranks == 1 else (f", per GPU of {plan.ranks}: layers sharded (FSDP)" if plan.fsdp
                                      else f", per GPU of {plan.ranks}: all replicated (DDP)")
    lines = [
        f"memory plan for {plan.model} (meta device: no weights read{per})",
        *([f"  note: {plan.config_note}"] if plan.config_note else []),
        f"  {plan.tokens}",
        f"  4-bit weights     {gib(plan.quant_bytes)}  {plan.quantized} linears, {plan.quant_params:,} params, "
        f"NF4 + absmax (~0.52 byte/param)",
        f"  float weights     {gib(plan.float_bytes)}  {plan.float_params:,} params (vision, embeddings, lm_head, norms)",
        f"  LoRA + trained    {gib(plan.trainable_bytes)}  {plan.adapted} adapters, {plan.lora_params:,} + "
        f"{plan.full_params:,} full params, fp32",
        f"  gradients         {gib(plan.grad_bytes)}  fp32, trainable params only",
        f"  optimizer state   {gib(plan.optim_bytes)}",
        f"  activations       {gib(plan.act_ckpt)}  with gradient checkpointing"
        f"{'  <- configured' if plan.gradient_checkpointing else ''}",
        f"                    {gib(plan.act_full)}  without{'' if plan.gradient_checkpointing else '  <- configured'}",
        f"    of which logits {gib(plan.logits_bytes)}  fp32, answer positions only"
        f"{f', {plan.logits_chunk} at a time' if plan.logits_chunk else ''}",
        f"  vision transient  {gib(plan.vision_transient)}  frozen tower's peak while it runs (before the rest)",
        *([f"  sampling KV cache {gib(plan.sampling)}  keys and values of the sampled rows, while generating "
           "(before the training forward)"] if plan.sampling else []),
        *([f"  FSDP saves        {gib(plan.quant_bytes + plan.float_bytes - plan.weights)}  of the weights above: the "
           f"layers' {gib(plan.layer_bytes).strip()} split {plan.ranks} ways, 2 layers of {gib(plan.largest_layer).strip()} "
           "gathered whole at a time"] if plan.fsdp and plan.ranks > 1 else []),
        f"  CUDA context      {gib(CUDA_CONTEXT)}",
        f"  total             {gib(plan.total())}  (checkpointing {ck}; "
        f"{gib(plan.total(not plan.gradient_checkpointing)).strip()} with it {'off' if plan.gradient_checkpointing else 'on'})",
        f"  host RAM to load  {gib(plan.host_streamed)}  streamed: largest float tensor + runtime "
        f"(a whole-model float load: {gib(plan.host_full).strip()})",
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    if gpu_memory is not None:
        spare = gpu_memory - plan.total()
        if spare >= 0:
            lines.append(f"  {gib(gpu_memory).strip()}: fits, {spare / GiB:.2f} GiB spare")
        else:
            hint = ("try smaller batch / max_length" if plan.gradient_checkpointing
                    else "try gradient_checkpointing / smaller batch / max_length")
            lines.append(f"  {gib(gpu_memory).strip()}: does not fit: needs {plan.total() / GiB:.2f} GiB; {hint}")
    return "\n".join(lines)
