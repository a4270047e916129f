"""Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct, 90B): a ViT over up to
max_image_tiles (4) tiles of 560 px -> a linear projector -> keys and values of the gated
cross-attention layers interleaved in a Llama 3.1 decoder (every fifth: 8 of its 40 layers).

No image tokens: the text holds one <|image|> per image, and the processor's
cross_attention_mask (batch, text, images, tiles) says which text positions may read which
image's tiles: each from its <|image|> to the end, none before (a text row that sees no image
skips the cross-attention layers' output). The processor builds it on the padded rows, left
padding included, and generate() extends it token by token: nothing here but the chat turns.
The resolution is the checkpoint's: tiles of 560 px, max_image_tiles of them (RESOLUTION).
"""

from functools import partial

from transformers import MllamaForConditionalGeneration

from minivlm.models import Layout, chat, from_config, processor

NAME = "Llama 3.2 Vision"
MODEL_CLASS = MllamaForConditionalGeneration
CHAT = True  # a chat template: a system turn and multi-turn dialogs
MAX_IMAGES = 1  # the processor takes more, but the checkpoints were tuned on one image per dialog
PACKING = False  # its images enter by cross-attention, an image mask per row: rows cannot be joined
PREFILL_ONCE = False  # GRPO's groups copy the prompt (evaluate.prefilled_once): its cross-attention mask grows each step from the prompt's
QUANT_SKIP = ["vision_model", "multi_modal_projector", "lm_head", "embed_tokens"]
# The cross-attention layers' q/k/v/o_proj are adapted too, as the self-attention ones.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SKIP = ["vision_model", "multi_modal_projector"]
# lora.vision adapts every linear in here: its local and global layers: self_attn.{q,k,v,o}_proj, mlp.fc1/fc2.
VISION_BLOCKS = "vision_model"
# None: every image is padded to max_image_tiles tiles, the number the tile position embeddings
# were trained for (a checkpoint's shapes), so a smaller image costs the tower no less.
RESOLUTION = ()
END_OF_TURN = "<|eot_id|>"

load_processor = processor.load
training_batch = partial(chat.training_batch, end_of_turn=END_OF_TURN)
generation_batch = chat.generation_batch
skeleton = partial(from_config, MODEL_CLASS)


def layout(model: MllamaForConditionalGeneration, preprocessor: dict) -> Layout:
    """max_num_tiles tiles through the tower (an image of fewer is padded), each (560/14)² + 1 patches; no image tokens in the
    text, whose cross-attention layers are among its num_hidden_layers."""
    c = model.config
    v = c.vision_config
    tiles = v.max_num_tiles
    patches = (v.image_size // v.patch_size) ** 2 + 1
    tc = c.get_text_config()
    padded = -(-patches // 8) * 8  # the tower pads each tile's patches to a multiple of 8
    how = f"images enter by cross-attention (up to {tiles} tiles × {patches} patches), not as tokens"
    return Layout(tc, v.hidden_size, v.intermediate_size, 0, tiles, patches, how,
                  vision_hidden_states=len(v.intermediate_layers_indices) + 2, vision_states=tiles * padded,
                  vision_state_readers=len(tc.cross_attention_layers))
