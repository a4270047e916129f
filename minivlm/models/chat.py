"""What chat-template families share: dialogs in, tokens out, loss on the assistant turns only.
(Every family also takes `leaves_no_state`, `single_exchange` and `answer_labels` from here.)

A sample is a dialog, a list of (user, assistant) exchanges; single-question data is a dialog
of one. It is rendered by the processor's own chat template (each checkpoint ships the one it
was trained with), the image attached to the first user turn:

    [system]  user: <image> question₁   assistant: answer₁   user: question₂   assistant: answer₂ …

The label mask must find each answer in the *processed* tokens, after the processor has
expanded <image> into many image tokens. We find it in the text instead: render the dialog up
to "assistant:" of exchange k and up to the end of answer k; tokenized (text only, no images),
the second has the answer's tokens beyond the shared prefix. The whole text, tokenized the same
way, is shorter than the processed row by exactly the tokens the processor inserted, all of
them before the first answer (the image); that difference maps text positions to row positions.
An answer is labelled up to and including its end token; what a template adds after (a
newline) is not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image


Dialog = list[tuple[str, str]]  # [(user text, assistant text), ...]


def leaves_no_state(batch_fn: Callable) -> Callable:
    """Wrap a family's training_batch/generation_batch so the processor it is given ends as it began.

    A fast tokenizer keeps the padding and truncation of its last call in its Rust backend, and
    save_pretrained writes them into tokenizer.json: a base saved after generating would reload
    left-padded. Families pass padding_side per call and this puts the backend back.
    """
    @functools.wraps(batch_fn)
    def wrapped(processor, *args, **kwargs):
        backend = processor.tokenizer.backend_tokenizer
        padding, truncation = backend.padding, backend.truncation
        try:
            return batch_fn(processor, *args, **kwargs)
        finally:
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
    return wrapped


def messages(dialog: Dialog, system: str = "", upto: int | None = None, answered: bool = True) -> list[dict]:
    """Chat messages for the first `upto` exchanges of `dialog` (all by default); the last one
    without its answer when `answered` is False."""
    exchanges = dialog[:upto]
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, (user, assistant) in enumerate(exchanges):
        image = [{"type": "image"}] if i == 0 else []
        turns.append({"role": "user", "content": [*image, {"type": "text", "text": user}]})
        if answered or i < len(exchanges) - 1:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return turns


def single_exchange(dialogs: list[Dialog]) -> tuple[list[str], list[str]]:
    """(prompts, answers) for families without a chat template (CHAT = False): one question per
    sample, no system turn; batches.check_dialogs has refused anything else before."""
    return [d[0][0] for d in dialogs], [d[0][1] for d in dialogs]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answer_labels(batch: dict[str, torch.Tensor], tokenizer, spans_text: list[list[tuple[str, str]]],
                  full_texts: list[str], end_token: str) -> torch.Tensor:
    """Labels for a processed `batch`: each answer's tokens up to and including `end_token`, else -100.

    spans_text[row] lists, per answer, (text up to the answer, text up to the answer's end);
    full_texts[row] is the row's whole text before image expansion.
    """
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (spans, full_text) in enumerate(zip(spans_text, full_texts)):
        real = batch["attention_mask"][row].nonzero().squeeze(1)  # positions of non-padding tokens
        inserted = len(real) - len(_ids(tokenizer, full_text))  # image tokens (and a BOS) the processor added
        for before, through in spans:
            through_ids = _ids(tokenizer, through)
            start = _shared_prefix(_ids(tokenizer, before), through_ids)
            span = real[inserted + start:inserted + len(through_ids)]
            ends = (batch["input_ids"][row, span] == end_id).nonzero()
            if len(ends) == 0:
                raise ValueError(f"no {end_token!r} after the answer in {through!r}: the prompt format does "
                                 "not end an answer as this family expects")
            span = span[: ends[-1].item() + 1]  # stop at the end token
            labels[row, span] = batch["input_ids"][row, span]
    return labels


@leaves_no_state
def training_batch(processor, images: list[Image.Image], dialogs: list[Dialog], end_of_turn: str,
                   system: str = "") -> dict[str, torch.Tensor]:
    """Processor tensors plus `labels`: every assistant answer and its end-of-turn token, else -100."""
    render = processor.apply_chat_template
    full_texts = [render(messages(d, system)) for d in dialogs]
    spans = [[(render(messages(d, system, k, answered=False), add_generation_prompt=True),
               render(messages(d, system, k))) for k in range(1, len(d) + 1)] for d in dialogs]
    batch = dict(processor(text=full_texts, images=[[im] for im in images], padding=True, padding_side="right",
                           return_tensors="pt"))
    batch["labels"] = answer_labels(batch, processor.tokenizer, spans, full_texts, end_of_turn)
    return batch


@leaves_no_state
def generation_batch(processor, images: list[Image.Image], prompts: list[str],
                     system: str = "") -> dict[str, torch.Tensor]:
    # Left padding: generation appends at the right end, so every row must end with its prompt.
    texts = [processor.apply_chat_template(messages([(p, "")], system, answered=False), add_generation_prompt=True)
             for p in prompts]
    return dict(processor(text=texts, images=[[im] for im in images], padding=True, padding_side="left",
                          return_tensors="pt"))
