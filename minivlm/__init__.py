"""minivlm: QLoRA fine-tuning of vision-language models in plain PyTorch."""

import logging
import warnings

# On CPUs with AVX512-BF16, importing bitsandbytes logs that an optional Hub kernel for its
# inference-only 4-bit layout is missing. minivlm turns that layout off (quant.py), so the
# message is noise on every run; other bitsandbytes warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def plain_warnings() -> None:
    """Show warnings as one `warning: ...` line, without the source line Python prints under them
    (the command-line scripts call this; tests and library users keep Python's format)."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
