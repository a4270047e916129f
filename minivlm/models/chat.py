"""What chat-template families share: dialogs in, tokens out, loss on the assistant turns only.
(Every family also takes `leaves_no_state`, `single_exchange` and `answer_labels` from here.)

A sample is its images and a dialog, a list of (user, assistant) exchanges; single-question data
is a dialog of one. It is rendered by the processor's own chat template (each checkpoint ships
the one it was trained with), each image where its <image> marker stands in a user turn, or all
of them at the start of the first user turn when the dialog has no markers:

    [system]  user: <image> question₁   assistant: answer₁   user: <image> question₂   assistant: answer₂ …

The label mask must find each answer in the *processed* tokens, after the processor has
expanded every image into many tokens (and, in some families, row and column markers). We find
it from the text: render the dialog up to "assistant:" of exchange k and up to the end of answer
k; tokenized (text only, no images), the second has the answer's tokens beyond the shared
prefix. Those tokens, with the header the template writes before every answer (its generation
prompt) in front of them, are then found in the processed row after the previous answer. No
count of image tokens is needed, so any placement works: an image after an answer, several in
one turn, a processor that expands an image differently beside others (LLaVA-OneVision drops
its crops then). The header keeps a user turn that ends in the answer's own tokens from being
taken for it. No image sits in an assistant turn, so no image token is ever labelled. An answer
is labelled up to and including its end token; what a template adds after (a newline) is not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.video_utils import VideoMetadata


Dialog = list[tuple[str, str]]  # [(user text, assistant text), ...]
IMAGE = "<image>"  # where a user turn holds one of the sample's images (LLaVA's and TRL's marker)
VIDEO = "<video>"  # ... one of its videos
MARKER = re.compile(f"({re.escape(IMAGE)}|{re.escape(VIDEO)})")


@dataclass
class Video:
    """A video as the model reads it: the frames sampled from it (data.video_frames, data.video_fps)
    and their rate, which Qwen2.5-VL turns into the time of its rotary positions."""

    frames: list[Image.Image]
    fps: float


Media = Image.Image | Video  # what a sample's markers place, in order


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


def media_counts(dialog: Dialog, media: int) -> list[int]:
    """How many of the sample's `media` (images and videos) each exchange's user turn holds: as its
    markers say, or all of them in the first turn when the dialog has none (data.sample_of has
    checked that a marked dialog marks every one, in order and of its kind, and only in user turns)."""
    marked = [len(MARKER.findall(user)) for user, _ in dialog]
    return marked if sum(marked) else [media] + [0] * (len(dialog) - 1)


def kind(item: Media) -> str:
    return "video" if isinstance(item, Video) else "image"


def _user_content(text: str, media: list[Media]) -> list[dict]:
    """A user turn's content parts: its text with an image or video part at each marker, or a part
    for each of `media` before the text when it has none."""
    if not MARKER.search(text):
        return [{"type": kind(m)} for m in media] + [{"type": "text", "text": text}]
    parts = []
    for piece in MARKER.split(text):
        if piece in (IMAGE, VIDEO):
            parts.append({"type": "image" if piece == IMAGE else "video"})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def messages(dialog: Dialog, media: list[Media], system: str = "", upto: int | None = None,
             answered: bool = True) -> list[dict]:
    """Chat messages for the first `upto` exchanges of `dialog` (all by default) with their share of
    the sample's `media`; the last one without its answer when `answered` is False."""
    exchanges = dialog[:upto]
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    held = 0
    for i, ((user, assistant), n) in enumerate(zip(exchanges, media_counts(dialog, len(media)))):
        turns.append({"role": "user", "content": _user_content(user, media[held:held + n])})
        held += n
        if answered or i < len(exchanges) - 1:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return turns


def plain(text: str) -> str:
    """A prompt without its <image> markers, for the families that always put their one image first."""
    return " ".join(piece.strip() for piece in text.split(IMAGE) if piece.strip()) if IMAGE in text else text


def processor_media(media: list[list[Media]]) -> dict:
    """A batch's media as the processor takes them: `images`, one list per sample, and `videos`, one
    list of frames per video, with each video's frame rate (`video_metadata`); each key only if the
    batch holds one."""
    images = [[m for m in ms if not isinstance(m, Video)] for ms in media]
    videos = [v for ms in media for v in ms if isinstance(v, Video)]
    given = {"images": images} if any(images) else {}
    if videos:
        given["videos"] = [v.frames for v in videos]
        given["video_metadata"] = [VideoMetadata(total_num_frames=len(v.frames), fps=v.fps,
                                                 frames_indices=list(range(len(v.frames)))) for v in videos]
    return given


def single_exchange(dialogs: list[Dialog]) -> tuple[list[str], list[str]]:
    """(prompts, answers) for families without a chat template (CHAT = False): one question per
    sample, no system turn, its one image first; batches.check_samples has refused anything else."""
    return [plain(d[0][0]) for d in dialogs], [d[0][1] for d in dialogs]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _find(row: list[int], needle: list[int], start: int) -> int:
    """Where `needle` first begins in `row` at or after `start`; -1 if nowhere."""
    for i in range(start, len(row) - len(needle) + 1):
        if row[i:i + len(needle)] == needle:
            return i
    return -1


def answer_labels(batch: dict[str, torch.Tensor], tokenizer, spans_text: list[list[tuple[str, str]]],
                  header: str, end_token: str) -> torch.Tensor:
    """Labels for a processed `batch`: each answer's tokens up to and including `end_token`, else -100.

    spans_text[row] lists, per answer, (text up to the answer, text up to the answer's end);
    `header` is the text the prompt format puts before every answer (the chat template's
    generation prompt), found with the answer in the processed row after the previous answer.
    """
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    context = len(_ids(tokenizer, header))
    labels = torch.full_like(batch["input_ids"], -100)
    for row, spans in enumerate(spans_text):
        real = batch["attention_mask"][row].nonzero().squeeze(1)  # positions of non-padding tokens
        ids = batch["input_ids"][row, real].tolist()
        searched = 0  # where the previous answer ended: this one comes after it
        for before, through in spans:
            through_ids = _ids(tokenizer, through)
            start = _shared_prefix(_ids(tokenizer, before), through_ids)
            needle = through_ids[max(start - context, 0):]  # the header, the answer and what ends it
            found = _find(ids, needle, searched)
            if found < 0:
                raise ValueError(f"the answer in {through!r} is not in the processed tokens as its text tokenizes: "
                                 "the processor changed the text around it")
            span = real[found + len(needle) - (len(through_ids) - start):found + len(needle)]
            searched = found + len(needle)
            ends = (batch["input_ids"][row, span] == end_id).nonzero()
            if len(ends) == 0:
                raise ValueError(f"no {end_token!r} after the answer in {through!r}: the prompt format does "
                                 "not end an answer as this family expects")
            span = span[: ends[-1].item() + 1]  # stop at the end token
            labels[row, span] = batch["input_ids"][row, span]
    return labels


def generation_prompt(processor) -> str:
    """What the chat template writes before an assistant answer, after the user turn's end."""
    turn = messages([("x", "")], [], answered=False)
    asked = processor.apply_chat_template(turn, add_generation_prompt=True)
    said = processor.apply_chat_template(turn, add_generation_prompt=False)
    if not asked.startswith(said):
        raise ValueError(f"the chat template's generation prompt is not an addition at the end of the text "
                         f"({said!r} -> {asked!r}): answers cannot be found after it")
    return asked[len(said):]


@leaves_no_state
def training_batch(processor, images: list[list[Media]], dialogs: list[Dialog], end_of_turn: str,
                   system: str = "") -> dict[str, torch.Tensor]:
    """Processor tensors plus `labels`: every assistant answer and its end-of-turn token, else -100.
    `images`: each sample's images and videos, in the order its dialog places them."""
    render = processor.apply_chat_template
    full_texts = [render(messages(d, ims, system)) for d, ims in zip(dialogs, images)]
    spans = [[(render(messages(d, ims, system, k, answered=False), add_generation_prompt=True),
               render(messages(d, ims, system, k))) for k in range(1, len(d) + 1)]
             for d, ims in zip(dialogs, images)]
    batch = dict(processor(text=full_texts, **processor_media(images), padding=True, padding_side="right",
                           return_tensors="pt"))
    batch["labels"] = answer_labels(batch, processor.tokenizer, spans, generation_prompt(processor), end_of_turn)
    return batch


@leaves_no_state
def generation_batch(processor, images: list[list[Media]], prompts: list[str],
                     system: str = "") -> dict[str, torch.Tensor]:
    # Left padding: generation appends at the right end, so every row must end with its prompt.
    texts = [processor.apply_chat_template(messages([(p, "")], ims, system, answered=False),
                                           add_generation_prompt=True) for p, ims in zip(prompts, images)]
    return dict(processor(text=texts, **processor_media(images), padding=True, padding_side="left",
                          return_tensors="pt"))
