"""SmolVLM2 (HuggingFaceTB/SmolVLM2-2.2B-Instruct, 500M, 256M): SmolVLM (smolvlm.py) trained on
video too. The same Idefics3 architecture, module names, tiles and chat format under
transformers' own SmolVLM classes, whose processor holds a video processor (processor.py).
"""

from functools import partial

from transformers import SmolVLMForConditionalGeneration, SmolVLMProcessor

from minivlm.models import from_config, processor
from minivlm.models.smolvlm import (CHAT, END_OF_TURN, LORA_SKIP, LORA_TARGETS, MAX_IMAGES, QUANT_SKIP,  # noqa: F401
                                    RESOLUTION, generation_batch, layout, training_batch)

NAME = "SmolVLM2"
MODEL_CLASS = SmolVLMForConditionalGeneration
load_processor = partial(processor.load, parts=SmolVLMProcessor)
skeleton = partial(from_config, MODEL_CLASS)
