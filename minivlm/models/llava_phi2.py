"""A LLaVA-style VLM assembled from two checkpoints: a CLIP vision encoder and Phi-2 (seed 001).

    image ─► CLIP ViT (frozen, float) ─► patch features of layer -2, CLS dropped  (n_patches, d_vision)
                                                 │
                                   projector: Linear ─ GELU ─ Linear  (trained in full, fp32)
                                                 ▼
    "User: <image>×n_patches\\n question\\nAssistant:" ─► Phi-2 embeddings, with the <image>
    positions overwritten by the projected patches ─► Phi-2 decoder (4-bit + LoRA) ─► answer

LLaVA (Liu et al. 2023) trains in two stages: first the projector alone on image captions
(lora.targets = [], lora.train_modules = ["projector"]), which teaches the projector to speak
Phi's embedding language; then projector + LoRA on instructions, starting from stage 1's
projector (train.init_from).

transformers' LlavaForConditionalGeneration would drop Phi-2's lm_head bias, so the model is
assembled here. A saved model is a small directory that names its two base checkpoints
(llava_phi2.json), holds the processor (Phi's tokenizer + <image>, CLIP's image processor, a
chat template) and, once trained, the projector; adapters live in train.py's checkpoints.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of `python -m minivlm.models.llava_phi2`, which writes a model directory (assemble)."""
    ap = argparse.ArgumentParser(description="Assemble a LLaVA-style model from a CLIP and a Phi checkpoint.")
    ap.add_argument("--language", default="microsoft/phi-2")
    ap.add_argument("--vision", default="openai/clip-vit-large-patch14-336")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


# `python -m minivlm.models.llava_phi2` runs this whole file first: its arguments are read here,
# ahead of the imports below (torch and transformers: seconds), so that --help and a missing --out
# answer at once; the end of the file reads them again.
if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig,  # noqa: E402
                          CLIPVisionModel, LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from minivlm.models import Layout, chat, processor  # noqa: E402

# Newlines are Jinja string literals: transformers renders templates with trim_blocks, which
# would eat a bare newline after a {% tag %}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% else %}{{ 'Assistant: ' + message['content'][0]['text'] + '<|endoftext|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|endoftext|>"  # Phi-2's eos


class LlavaPhi(nn.Module):
    """CLIP vision tower + MLP projector + a causal LM, joined by overwriting <image> embeddings."""

    def __init__(self, language_model: nn.Module, vision_tower: CLIPVisionModel, image_token_id: int,
                 sources: dict, feature_layer: int = -2):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        d_vision, d_text = vision_tower.config.hidden_size, language_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(d_vision, d_text), nn.GELU(), nn.Linear(d_text, d_text))
        self.image_token_id = image_token_id
        self.feature_layer = feature_layer
        self.sources = sources  # {"language_model": ..., "vision_model": ...}: what save_pretrained records

    @property
    def config(self):
        return self.language_model.config

    def activation_checkpointing_enable(self, **kwargs) -> None:
        self.language_model.activation_checkpointing_enable(**kwargs)

    def disable_input_require_grads(self) -> None:
        self.language_model.disable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.language_model.is_activation_checkpointing

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each image's projected patches in place of its <image> tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        patches = self.projector(hidden[:, 1:])  # drop CLS: (images, n_patches, d_text)
        slots = input_ids == self.image_token_id
        if slots.sum() != patches.shape[0] * patches.shape[1]:
            raise ValueError(f"{int(slots.sum())} <image> tokens for {patches.shape[0]} images × "
                             f"{patches.shape[1]} patches: processor and vision tower disagree")
        return embeds.masked_scatter(slots.unsqueeze(-1), patches.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs):
        return self.language_model(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                                   **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        new = self.language_model.generate(inputs_embeds=self.embed(input_ids, pixel_values),
                                           attention_mask=attention_mask, **kwargs)
        # generate() from embeddings returns only the new tokens, num_return_sequences rows a prompt
        return torch.cat([input_ids.repeat_interleave(len(new) // len(input_ids), 0), new], dim=1)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "LlavaPhi":
        path = Path(path)
        spec_file = path / "llava_phi2.json"
        if not spec_file.is_file():
            raise OSError(f"{path} is not an assembled LLaVA-Phi model (no llava_phi2.json); make one with "
                          "python -m minivlm.models.llava_phi2 --language microsoft/phi-2 "
                          "--vision openai/clip-vit-large-patch14-336 --out <dir>")
        spec = json.loads(spec_file.read_text())
        model = cls(AutoModelForCausalLM.from_pretrained(spec["language_model"], dtype=dtype),
                    CLIPVisionModel.from_pretrained(spec["vision_model"], dtype=dtype),
                    spec["image_token_id"], {k: spec[k] for k in ("language_model", "vision_model")})
        if (path / "projector.safetensors").is_file():
            model.projector.load_state_dict(load_file(path / "projector.safetensors"))
        return model.to(dtype)

    def save_pretrained(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "llava_phi2.json").write_text(json.dumps({**self.sources, "image_token_id": self.image_token_id},
                                                        indent=2))
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, out / "projector.safetensors")


def assemble(language_model: str, vision_model: str, out: str | Path, seed: int = 0) -> Path:
    """Write the directory `model.name_or_path` points at: sources, processor, a fresh projector."""
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vision = CLIPVisionModel.from_pretrained(vision_model)
    image_processor = CLIPImageProcessorPil.from_pretrained(vision_model)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.config.patch_size, vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    lm = AutoModelForCausalLM.from_pretrained(language_model)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= lm.get_input_embeddings().num_embeddings:
        raise ValueError(f"{language_model}'s embedding has no row for the new {IMAGE_TOKEN} token; "
                         "its vocab must have spare rows (Phi-2 has 51200 for 50295 tokens)")
    torch.manual_seed(seed)
    model = LlavaPhi(lm, vision, image_token_id, {"language_model": language_model, "vision_model": vision_model})
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


NAME = "LLaVA-Phi-2"
MODEL_CLASS = LlavaPhi
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = 1  # the LLaVA-1.5 recipe: one image per conversation
PACKING = True  # data.packing (packing.py): samples end to end in one row
PREFILL_ONCE = False  # GRPO's groups copy the prompt (evaluate.prefilled_once): its own generate embeds the images itself, returns ids only
QUANT_SKIP = ["vision_tower", "projector", "lm_head", "embed_tokens"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LORA_SKIP = ["vision_tower", "projector"]
# lora.vision adapts every linear in here: CLIP's encoder layers: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_tower"

load_processor = processor.load
RESOLUTION = ()  # CLIP at its checkpoint's one size
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch


def skeleton(path: str, dtype: torch.dtype) -> LlavaPhi:
    """The model from its two checkpoints' config.json files alone (the planner calls it on the meta
    device); a source path in llava_phi2.json is read relative to it if it exists there."""
    spec = json.loads((Path(path) / "llava_phi2.json").read_text())

    def resolve(source: str) -> str:
        return str(Path(path) / source) if (Path(path) / source).exists() else source

    language = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(spec["language_model"])), dtype=dtype)
    vision = CLIPVisionModel._from_config(CLIPVisionConfig.from_pretrained(resolve(spec["vision_model"])), dtype=dtype)
    return LlavaPhi(language, vision, spec["image_token_id"], spec).to(dtype)


def layout(model: LlavaPhi, preprocessor: dict) -> Layout:
    """Every CLIP patch one token (the CLS position dropped); the tower returns all its hidden states
    (feature_layer = -2), and the projector, trained in full in both stages, keeps its input and
    its hidden layer for backward."""
    v, tc = model.vision_tower.config, model.config
    n = (v.image_size // v.patch_size) ** 2
    return Layout(tc, v.hidden_size, v.intermediate_size, n, 1, n + 1, f"{n} image tokens (CLIP patches, CLS dropped)",
                  vision_hidden_states=v.num_hidden_layers + 1, connector_saved_width=v.hidden_size + 2 * tc.hidden_size)


if __name__ == "__main__":
    args = parse_args()
    print(f"assembled {assemble(args.language, args.vision, args.out)}")
