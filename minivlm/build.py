"""From config to a QLoRA-ready model: load, quantized as read -> (checkpointing) -> inject LoRA."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx2
import torch
from huggingface_hub import constants, get_session, try_to_load_from_cache
from torch import nn
from transformers import PreTrainedModel

from minivlm import distributed, packing
from minivlm.batches import check_images, check_video
from minivlm.config import Config, ConfigError
from minivlm.load import float_weights, load_pretrained
from minivlm.lora import count_parameters, inject_lora
from minivlm.lora_init import initialize
from minivlm.models import get_family
from minivlm.quant import quantize_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    model: nn.Module
    processor: object
    family: ModuleType
    device: torch.device
    quantized: list[str]  # names of the Linear4bit layers
    adapted: list[str]  # names of the LoRALinear layers
    trainable_params: int
    total_params: int


def pick_device(name: str) -> torch.device:
    """train.device as a torch.device; under torchrun on GPUs, each rank's own (cuda:LOCAL_RANK)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and distributed.launched():
        return torch.device("cuda", distributed.local_rank())
    return device


def is_hub_id(name_or_path: str) -> bool:
    """Whether from_pretrained would take `name_or_path` for a hub id: it takes whatever is not an
    existing path for one, but a hub id is "name" or "owner/name", so ./x, /x, ~/x and a/b/c can
    only be paths (mistyped ones)."""
    return (bool(name_or_path) and not Path(name_or_path).expanduser().exists()
            and not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") <= 1)


# Why this process reads the hub from its local cache only, once hub_offline_reason has probed it:
# "" while the endpoint answered, else what went wrong.
_probed: str | None = None


def hub_offline_reason() -> str | None:
    """Why hub files come from the local cache only ("HF_HUB_OFFLINE=1", or the endpoint that could
    not be reached); None while the hub is in reach.

    huggingface_hub asks for each file once and, when that cannot connect and the file is not
    cached, five times more after waits of 1, 2, 4, 8 and 8 s: 23 s a file, and loading a
    processor asks for six (152 s before a training run's error). Instead, the first call sends one
    request to the endpoint (HF_ENDPOINT's, through the hub's own client: its proxies too) and, if
    none connects, turns the process offline as HF_HUB_OFFLINE=1 does: cached files still load,
    a missing one fails at once. Any HTTP answer, even an error, means the hub is in reach; then
    its own retries stand, for a hub that answers 5xx is worth waiting for.
    """
    global _probed
    if _probed is None and not constants.HF_HUB_OFFLINE:
        try:
            get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
            _probed = ""
        except httpx2.TransportError as e:  # no HTTP answer: refused, unresolved, timed out, cut off
            _probed = f"{constants.ENDPOINT} cannot be reached: {type(e).__name__}: {str(e).rstrip('.')}"
            constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub and transformers
    return (_probed or "HF_HUB_OFFLINE=1") if constants.HF_HUB_OFFLINE else None


def check_model_source(name_or_path: str) -> None:
    """Fail at once, in one line, where loading the model would fail later, slowly or misleadingly.

    from_pretrained takes whatever is not an existing directory for a hub id: a mistyped path
    would be reported as a Hub or network problem. A hub id missing from the local cache needs
    the network: with none (HF_HUB_OFFLINE=1, which the Makefile sets, or a hub that cannot be
    reached: hub_offline_reason) that is known now.
    """
    key = f"model.name_or_path = {name_or_path!r}"
    path = Path(name_or_path).expanduser()
    if not name_or_path:
        raise ConfigError("model.name_or_path is empty; set it to a local checkpoint directory or a hub id")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key} is a file; point it at the directory that holds config.json and the weights")
        return
    if not is_hub_id(name_or_path):
        raise ConfigError(f"{key}: not found: {path.absolute()}; point it at a directory holding a checkpoint "
                          "(config.json + *.safetensors)")
    offline = hub_offline_reason()
    if offline is None:
        return
    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise ConfigError(f"{key} is not a local directory, and this hub id is not in the Hugging Face cache "
                          f"({offline}): download it once with network (hf download {name_or_path}) "
                          "or point it at a local directory")
    if _probed:  # offline since the probe, not by the user's HF_HUB_OFFLINE=1: say why
        warnings.warn(f"{offline}; {name_or_path} is read from the Hugging Face cache")


def _load_error(name_or_path: str, e: OSError) -> ConfigError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"cannot load model.name_or_path = {name_or_path!r}: {first_line}; a local directory "
                       "needs config.json and the weights; a hub id must be downloaded first "
                       f"(hf download {name_or_path})")


def load_processor(cfg: Config) -> object:
    """The family's processor for model.name_or_path: cheap (no weights), so a bad path shows up early."""
    check_model_source(cfg.model.name_or_path)
    family = get_family(cfg.model.family)
    unknown = sorted(set(cfg.model.processor) - set(family.RESOLUTION))
    if unknown:
        known = (f"its resolution controls are {', '.join(family.RESOLUTION)}" if family.RESOLUTION
                 else "its resolution is fixed by the checkpoint")
        raise ConfigError(f"model.processor: {family.NAME}'s processor has no {', '.join(unknown)}; {known}")
    check_images(family, cfg.data.max_images, "data.max_images is")
    check_video(family, cfg)
    packing.check(family, cfg)
    video = {"video_resolution": cfg.model.video_processor} if hasattr(family, "VIDEO_RESOLUTION") else {}
    try:
        # The model classes are the families' own transformers classes; remote code can only
        # come in through a checkpoint's custom processor, so this is where the flag goes.
        return family.load_processor(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                     **video, **cfg.model.processor)
    except OSError as e:
        raise _load_error(cfg.model.name_or_path, e) from None


def build(cfg: Config, processor: object | None = None) -> Built:
    """Load the base model named in the config and make it ready for QLoRA training.

    `processor`: the family's processor if the caller has loaded it already (train.py does, to
    check the data before the model is read); else it is loaded here.
    """
    family = get_family(cfg.model.family)
    device = pick_device(cfg.train.device)
    dtype = DTYPES[cfg.model.dtype]
    quant = cfg.quant
    skip = family.QUANT_SKIP if quant.skip is None else quant.skip
    storage = dtype if cfg.train.fsdp else torch.uint8  # FSDP shards one float dtype per layer (quant.py)
    if processor is None:
        processor = load_processor(cfg)
    # lora_init's W for a layer: the layer's own float weight, unless it is 4-bit (set below).
    float_weight = None
    try:
        if issubclass(family.MODEL_CLASS, PreTrainedModel):
            # Streamed: read one tensor at a time, each 4-bit weight quantized as it arrives, straight
            # to the device. The host never holds the float model.
            # A resolution key the model reads too (LLaVA-OneVision's pinpoints) goes to both.
            shared = {k: v for k, v in cfg.model.processor.items() if k in getattr(family, "MODEL_RESOLUTION", ())}
            model, quantized = load_pretrained(family.MODEL_CLASS, cfg.model.name_or_path, dtype, device,
                                               quant.load_in_4bit, skip, quant.quant_type, quant.double_quant,
                                               storage, shared)
            if quantized and cfg.lora.init != "default":  # lora_init needs W, and the model holds Q(W)
                float_weight = float_weights(family.MODEL_CLASS, cfg.model.name_or_path, dtype, shared)
        else:
            # LLaVA-Phi is assembled from two checkpoints by its own from_pretrained: loaded whole in
            # float on the host, then quantized one layer at a time onto the device.
            model = family.MODEL_CLASS.from_pretrained(cfg.model.name_or_path, dtype=dtype)
            if quant.load_in_4bit and cfg.lora.init != "default":  # lora_init needs W: kept until it has run
                floats = {n: m.weight for n, m in model.named_modules() if type(m) is nn.Linear}
                float_weight = floats.__getitem__
            quantized = (quantize_linears(model, skip, dtype, device, quant.quant_type, quant.double_quant,
                                          storage) if quant.load_in_4bit else [])
            model.to(device)
    except OSError as e:
        raise _load_error(cfg.model.name_or_path, e) from None
    if cfg.train.gradient_checkpointing:
        # Each decoder layer keeps only its input and recomputes the rest in backward. The
        # non-reentrant variant tracks gradients through the recomputation itself, so adapters
        # get theirs although the layer's input (from frozen embeddings) requires no grad.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers then also makes every input embedding's output require grad (a fix for the
        # reentrant variant). One of them is the frozen vision tower's patch embedding: the whole
        # tower would then keep its activations and run backward for a gradient nobody reads.
        model.disable_input_require_grads()
    model.config.use_cache = False
    # A's random init; Python's RNG too (no library here draws from it, but a save keeps its state:
    # seeded, two runs of one config save the same bytes).
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    adapted = inject_lora(
        model,
        targets=family.LORA_TARGETS if cfg.lora.targets is None else cfg.lora.targets,
        skip=family.LORA_SKIP if cfg.lora.skip is None else cfg.lora.skip,
        r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, train_modules=cfg.lora.train_modules,
        shared_dropout=cfg.lora.shared_dropout, rslora=cfg.lora.use_rslora, dora=cfg.lora.use_dora,
        vision=family.VISION_BLOCKS if cfg.lora.vision else None,
    )
    if cfg.lora.init != "default":
        initialize(model, cfg.lora.init, float_weight or (lambda name: model.get_submodule(name).base.weight),
                   cfg.lora.loftq_iterations, quant.quant_type, quant.double_quant)
    trainable, total = count_parameters(model)
    return Built(model, processor, family, device, quantized, adapted, trainable, total)
