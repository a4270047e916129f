"""What chat-template families share: turns in, tokens out, loss on the assistant turn only.
(`answer_labels` serves every family whose processor takes a prompt followed by its answer.)

A sample becomes the conversation

    [system]  user: <image> prompt   assistant: answer

rendered by the processor's own chat template (each checkpoint ships the one it was trained
with). The label mask needs to know where the assistant's answer starts in the *processed*
tokens, after the processor has expanded each <image> into its many image tokens. The image
comes before the answer, so counting from the end is safe: render the conversation with and
without the answer, tokenize both texts (no images needed), and the tokens the full text has
beyond the shared prefix are the answer's. They are labelled up to and including the turn's
end token; whatever the template adds after it (a newline) is not.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor


def load_processor(name_or_path: str):
    return AutoProcessor.from_pretrained(name_or_path)


def conversation(prompt: str, answer: str | None = None, system: str = "") -> list[dict]:
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    turns.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def _answer_token_count(tokenizer, prompt_text: str, full_text: str) -> int:
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    shared = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        shared += 1
    return len(full_ids) - shared


def answer_labels(batch: dict[str, torch.Tensor], tokenizer, prompt_texts: list[str], full_texts: list[str],
                  end_token: str) -> torch.Tensor:
    """Labels for processed `batch`: the answer tokens up to and including `end_token`, else -100.

    `full_texts[i]` is `prompt_texts[i]` followed by the answer, as text before image expansion.
    """
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (prompt_text, full_text) in enumerate(zip(prompt_texts, full_texts)):
        n_answer = _answer_token_count(tokenizer, prompt_text, full_text)
        real = batch["attention_mask"][row].nonzero().squeeze(1)  # positions of non-padding tokens
        span = real[len(real) - n_answer:]
        ends = (batch["input_ids"][row, span] == end_id).nonzero()
        if len(ends) == 0:
            raise ValueError(f"no {end_token!r} after the answer in {full_text!r}: the prompt format does "
                             "not end the answer as this family expects")
        span = span[: ends[-1].item() + 1]  # stop at the end token
        labels[row, span] = batch["input_ids"][row, span]
    return labels


def training_batch(processor, images: list[Image.Image], prompts: list[str], answers: list[str],
                   end_of_turn: str, system: str = "") -> dict[str, torch.Tensor]:
    """Processor tensors plus `labels`: the answer tokens and the end-of-turn token, else -100."""
    processor.tokenizer.padding_side = "right"
    prompt_texts = [processor.apply_chat_template(conversation(p, system=system), add_generation_prompt=True)
                    for p in prompts]
    full_texts = [processor.apply_chat_template(conversation(p, a, system)) for p, a in zip(prompts, answers)]
    batch = dict(processor(text=full_texts, images=[[im] for im in images], padding=True, return_tensors="pt"))
    batch["labels"] = answer_labels(batch, processor.tokenizer, prompt_texts, full_texts, end_of_turn)
    return batch


def generation_batch(processor, images: list[Image.Image], prompts: list[str],
                     system: str = "") -> dict[str, torch.Tensor]:
    # Left padding: generation appends at the right end, so every row must end with its prompt.
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(conversation(p, system=system), add_generation_prompt=True)
             for p in prompts]
    return dict(processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt"))
