"""Tiny random-weight models of the real architectures, with word-level tokenizers and the
checkpoints' real chat templates, saved like hub checkpoints. Built by the test fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, Idefics3Config,
                          Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig, LlamaConfig,
                          MistralConfig, PreTrainedTokenizerFast)
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig, Idefics2VisionConfig
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from demo.shapes import CAPTION_PROMPTS, SPANISH, VOCAB  # noqa: F401  (the words the fixtures speak)

# The chat templates of HuggingFaceM4/idefics2-8b and HuggingFaceTB/SmolVLM-Instruct (Idefics3).
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS2_TEMPLATE

CHAT_WORDS = ["User", "Assistant", "System", ":"]


def word_tokenizer(specials: list[str], extra_words: list[str] = ()) -> PreTrainedTokenizerFast:
    base = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(base + sorted(set(VOCAB) | set(extra_words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Whitespace also splits off punctuation, so "Assistant:" is two tokens, as in real tokenizers.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def save_tiny_idefics2(out: Path, hidden: int = 64) -> Path:
    tokenizer = word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"], CHAT_WORDS)
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=True,
                                                size={"shortest_edge": 32, "longest_edge": 32})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS2_TEMPLATE)
    config = Idefics2Config(
        vision_config=Idefics2VisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
        perceiver_config=Idefics2PerceiverConfig(hidden_size=hidden, resampler_n_latents=4, resampler_depth=1,
                                                 resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  pad_token_id=tokenizer.pad_token_id),
        image_token_id=processor.image_token_id)
    torch.manual_seed(0)
    Idefics2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_smolvlm(out: Path, hidden: int = 64) -> Path:
    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                                "<|im_start|>", *grid],
                               CHAT_WORDS)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 32})
    # image_seq_len = (image_size / patch_size)² / scale_factor² = (32 / 8)² / 2² = 4
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=processor.image_token_id)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_idefics(out: Path, hidden: int = 64) -> Path:
    """IDEFICS (v1, Flamingo-style): a Llama decoder with gated cross-attention to CLIP-style image features."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    tokenizer = word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
                               ["Question", "Answer", "This", ":", ".", "?", "'", "s", "What", "on", "picture"])
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=32), tokenizer=tokenizer,
                                 image_size=32)
    config = IdeficsConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, cross_layer_interval=1, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_config=IdeficsVisionConfig(embed_dim=hidden, image_size=32, patch_size=8, intermediate_size=2 * hidden,
                                          num_hidden_layers=1, num_attention_heads=2),
        alpha_initializer="ones")  # open gates (tanh(1)), so the image reaches the text
    torch.manual_seed(0)
    IdeficsForVisionText2Text(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_phi_and_clip(out: Path, hidden: int = 64) -> tuple[Path, Path]:
    """Two separate checkpoints, as on the hub: a Phi causal LM with its tokenizer, a CLIP vision model
    with its image processor. llava_phi2.assemble joins them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    phi_dir, clip_dir = out / "phi", out / "clip"
    tokenizer = word_tokenizer([], CHAT_WORDS)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(vocab_size=len(tokenizer) + 8, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=2, num_attention_heads=2, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)).save_pretrained(phi_dir)
    tokenizer.save_pretrained(phi_dir)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    return phi_dir, clip_dir
