"""Tiny random-weight models of the real architectures, with word-level tokenizers and the
checkpoints' real chat templates, saved like hub checkpoints. Built by the test fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, Idefics3Config,
                          Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig,
                          MistralConfig, PreTrainedTokenizerFast)
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig, Idefics2VisionConfig
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from demo.pretrain_base import QWEN_VL_TEMPLATE  # the real checkpoints' chat template, as the demo base uses it
from demo.shapes import CAPTION_PROMPTS, SPANISH, VOCAB  # noqa: F401  (the words the fixtures speak)

# The chat templates of HuggingFaceM4/idefics2-8b and HuggingFaceTB/SmolVLM-Instruct (Idefics3).
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS2_TEMPLATE

CHAT_WORDS = ["User", "Assistant", "System", ":"]

# Today's families, each with a save_tiny_<name> below (and a tiny_<name> fixture in conftest.py):
# tests/test_architectures.py runs every check on each.
ARCHITECTURES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "gemma3", "smolvlm2", "llava_onevision", "internvl", "mistral3", "mllama"]


def word_tokenizer(specials: list[str], extra_words: list[str] = (), named: dict[str, str] | None = None
                   ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the fixtures' words; `specials` added, `named` ones (Gemma 3's
    {"image_token": ...}) reachable as attributes, as the processors look them up."""
    base = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(base + sorted(set(VOCAB) | set(extra_words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Whitespace also splits off punctuation, so "Assistant:" is two tokens, as in real tokenizers.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", extra_special_tokens=named or {})
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def saved(out: Path, model_class, config, processor, eos_token: str | None = None) -> Path:
    """A random-weight `model_class(config)` (seed 0) and its processor, saved in `out` like a hub
    checkpoint; generation pads with the tokenizer's pad token and stops at `eos_token` if given."""
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if eos_token:
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(eos_token)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


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


# SmolVLM2's (HuggingFaceTB/SmolVLM2-2.2B-Instruct, from memory): SmolVLM's, and a video writes <video>.
SMOLVLM2_TEMPLATE = SMOLVLM_TEMPLATE.replace("{{ '<image>' }}{% endif %}",
                                             "{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}")


def save_tiny_smolvlm(out: Path, hidden: int = 64, version: str = "1") -> Path:
    """SmolVLM (`version` "1": transformers' Idefics3 classes) or SmolVLM2 ("2": its SmolVLM
    classes, the same architecture, and a processor that also holds a video processor)."""
    import transformers
    from minivlm.models.processor import ImagesOnly

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                                "<|im_start|>", "<video>", *grid],
                               CHAT_WORDS)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 32})
    # image_seq_len = (image_size / patch_size)² / scale_factor² = (32 / 8)² / 2² = 4
    if version == "1":
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=SMOLVLM_TEMPLATE)
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        image_processor = SmolVLMImageProcessorPil(**image_processor.to_dict())
        processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=ImagesOnly(), image_seq_len=4,
                                                  chat_template=SMOLVLM2_TEMPLATE)
    config_class, model_class = {"1": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "2": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration)}[version]
    config = config_class(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=processor.image_token_id)
    return saved(out, model_class, config, processor)


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


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def qwen2_5_vl(tokenizer, hidden: int = 64, layers: int = 2, vision_hidden: int = 32, patch: int = 4):
    """A Qwen2.5-VL config of the real architecture, small: ViT with window attention and one
    full-attention block, 2×2 patch merger, M-RoPE sections summing to half the head dim."""
    from transformers import Qwen2_5_VLConfig

    heads = 2
    half = hidden // heads // 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           window_size=4 * patch, fullatt_block_indexes=[1]),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)


def qwen_processor(processor_class, tokenizer, patch: int = 4, **resolution):
    from minivlm.models.processor import ImagesOnly
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                      **({"min_pixels": 16 * 16, "max_pixels": 64 * 64} | resolution))
    return processor_class(image_processor=images, tokenizer=tokenizer, video_processor=ImagesOnly(),
                           chat_template=QWEN_VL_TEMPLATE)


def save_tiny_qwen(out: Path, version: str, hidden: int = 64) -> Path:
    """A tiny Qwen2-VL or Qwen2.5-VL (`version` "2" or "2_5"): the 2.5 config, and for Qwen2-VL its
    vision config's names (embed_dim the width, hidden_size the merger's output, mlp_ratio)."""
    import transformers

    tokenizer = word_tokenizer(QWEN_SPECIALS, CHAT_WORDS + ["system", "user", "assistant", "You", "are", "a",
                                                            "helpful", "."])
    processor_class = {"2": transformers.Qwen2VLProcessor, "2_5": transformers.Qwen2_5_VLProcessor}[version]
    processor = qwen_processor(processor_class, tokenizer)
    config = qwen2_5_vl(tokenizer, hidden)
    if version == "2":
        v = config.vision_config
        config = transformers.Qwen2VLConfig(
            text_config=config.text_config.to_dict(),
            vision_config=dict(depth=v.depth, embed_dim=v.hidden_size, hidden_size=hidden, mlp_ratio=2,
                               num_heads=v.num_heads, patch_size=v.patch_size, spatial_merge_size=2,
                               temporal_patch_size=2),
            image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Qwen3-VL's chat template, as far as these tests reach: Qwen2.5-VL's ChatML without the default
# system turn (reconstructed; the checkpoints' template also renders tools and reasoning).
QWEN3_VL_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")


def save_tiny_qwen3_vl(out: Path, hidden: int = 64) -> Path:
    """Qwen3-VL: a ViT with learned positions (8×8, interpolated) and one DeepStack block feeding
    the first decoder layer; a Qwen3 decoder (q/k norms) with interleaved M-RoPE."""
    import transformers

    tokenizer = word_tokenizer(QWEN_SPECIALS, CHAT_WORDS + ["system", "user", "assistant"])
    processor = qwen_processor(transformers.Qwen3VLProcessor, tokenizer)
    processor.chat_template = QWEN3_VL_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    half = hidden // 2 // 2
    config = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=ids("<|im_end|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                          "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return saved(out, transformers.Qwen3VLForConditionalGeneration, config, processor, "<|im_end|>")


# Gemma 3's chat template (google/gemma-3-4b-it): the system text opens the first user turn, the
# assistant is "model", each image is <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")


def save_tiny_gemma3(out: Path, hidden: int = 64) -> Path:
    """SigLIP at 32 px (4×4 patches of 8), pooled to 4 soft tokens an image; a Gemma 3 decoder with
    one sliding-window and one global layer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = word_tokenizer(["<start_of_turn>", "<end_of_turn>"], CHAT_WORDS + ["user", "model"],
                               {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"})
    # The pan-and-scan settings saved as null, as in the real preprocessor_config.json: the processor's
    # call-time defaults (Gemma3Processor.images_kwargs) hold them.
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=4)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         query_pre_attn_scalar=32, sliding_window=16, layer_types=["sliding_attention",
                                                                                   "full_attention"],
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=ids("<end_of_turn>")),
        vision_config=SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), pad_token_id=tokenizer.pad_token_id)
    return saved(out, Gemma3ForConditionalGeneration, config, processor)


# LLaVA-OneVision's chat template (llava-hf/llava-onevision-qwen2-7b-ov-hf, as transformers'
# conversion script writes it): images, then videos, then the text of each turn.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Crops of 32 px, in grids up to 2×2.
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def save_tiny_llava_onevision(out: Path, hidden: int = 64) -> Path:
    """SigLIP at 32 px (4×4 features a crop), anyres over PINPOINTS, a Qwen2 decoder."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from minivlm.models.processor import ImagesOnly

    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                               CHAT_WORDS + ["system", "user", "assistant"])
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=ImagesOnly(),
                                        num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=LLAVA_ONEVISION_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=ids("<|im_end|>")),
        image_token_id=ids("<image>"), video_token_id=ids("<video>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    return saved(out, LlavaOnevisionForConditionalGeneration, config, processor, "<|im_end|>")


# InternVL's chat template (transformers' conversion script for the OpenGVLab/InternVL3-*-hf checkpoints).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")


def save_tiny_internvl(out: Path, hidden: int = 64) -> Path:
    """InternViT at 32 px (4×4 patches of 8, pixel-shuffled to 4 tokens a tile), tiles of 32 px
    up to 4 and a thumbnail, a Qwen2 decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from minivlm.models.processor import ImagesOnly

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>"], CHAT_WORDS + ["system", "user", "assistant"], named)
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4)
    processor = InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=ImagesOnly(),
                                  image_seq_length=4, chat_template=INTERNVL_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    config = InternVLConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=ids("<|im_end|>")),
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    return saved(out, InternVLForConditionalGeneration, config, processor, "<|im_end|>")


# Mistral Small 3.1's chat template (mistralai/Mistral-Small-3.1-24B-Instruct-2503), from memory and
# with its default system prompt shortened: a system turn in [SYSTEM_PROMPT], each user turn in
# [INST] ... [/INST], each answer closed by eos.
MISTRAL3_TEMPLATE = (
    "{%- set today = strftime_now('%Y-%m-%d') %}"
    "{%- set default_system_message = 'You are a helpful assistant. Today is ' + today + '.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}")


def save_tiny_mistral3(out: Path, hidden: int = 64) -> Path:
    """Pixtral at up to 64 px (patches of 8, merged 2×2: 16 px a token), a Mistral decoder."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    from minivlm.models.processor import pixtral_processor

    tokenizer = word_tokenizer(["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]",
                                "[IMG_END]"], CHAT_WORDS + ["You", "are", "a", "helpful", "assistant", "Today", "is",
                                                            "."])
    images = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    processor = pixtral_processor()(image_processor=images, tokenizer=tokenizer, patch_size=8, spatial_merge_size=2,
                                    chat_template=MISTRAL3_TEMPLATE)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                          num_attention_heads=2, head_dim=hidden // 2, image_size=64, patch_size=8),
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, tie_word_embeddings=False)
    return saved(out, Mistral3ForConditionalGeneration, config, processor)


# Llama 3.2 Vision's chat template (meta-llama/Llama-3.2-11B-Vision-Instruct), simplified from memory:
# its tools and its dated default system turn left out; each turn between headers, ended by <|eot_id|>.
MLLAMA_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def save_tiny_mllama(out: Path, hidden: int = 64) -> Path:
    """The ViT on up to 4 tiles of 64 px (64 patches of 8 + a class token each), one global layer;
    a decoder of 4 layers, two of them gated cross-attention: the vision states they read are
    most of what a sample keeps for backward, as with the real 4 × 1601 positions."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = word_tokenizer(["<|image|>", "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"], CHAT_WORDS + ["system", "user", "assistant"])
    images = MllamaImageProcessorPil(size={"height": 64, "width": 64}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    config = MllamaConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=64, patch_size=8, max_num_tiles=4,
                           intermediate_layers_indices=[0], vision_output_dim=2 * hidden),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=4, cross_attention_layers=[1, 3], num_attention_heads=2,
                         num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=ids("<|eot_id|>")),
        image_token_index=ids("<|image|>"))
    return saved(out, MllamaForConditionalGeneration, config, processor, "<|eot_id|>")
