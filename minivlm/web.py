"""The page `infer.py --config X --checkpoint Y --web` serves: a fine-tuned model beside its base.

Tab "Ask": an image (uploaded, or one of the first rows of the eval split), a question, generate's
settings; the base model's answer and the fine-tuned one side by side. Tab "Run": the run's
curves.png and metrics.json, read again each time the tab is opened (a run still training moves on).

One model in memory serves both answers. The fine-tuned answer is the model as infer.py loads it,
base + adapter; the base answer is the same model inside lora.adapters_off, where every LoRALinear
computes its frozen base layer alone: bit for bit the model infer.py builds without --checkpoint, for
no second copy of the weights. Modules trained in full (lora.train_modules) have no frozen original
to fall back to: they stay as trained, and the page says so. The switch flips the whole model, so one
question is answered at a time (LOCK): no fine-tuned answer may run while another's adapters are off.

gradio is imported here and nowhere else, and infer.py imports this module only for --web.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from minivlm.batches import check_samples, samples
from minivlm.build import Built
from minivlm.config import Config, ConfigError
from minivlm.data import head, load_split, message_text, prompt_of, read_image, references_of
from minivlm.evaluate import generated
from minivlm.lora import adapters_off
from minivlm.models import get_family
from minivlm.models.chat import Video

# The split's first rows: decoding a whole split (VQAv2's validation split: 214k rows) would hold the page up.
EXAMPLES = 32
LOCK = threading.Lock()
# The image fills its box (gradio 6's class names): gradio shows it at its own size, a 32×32 shape as a dot.
CSS = "#image .upload-container, #image .image-frame, #image img { width: 100%; height: 100%; object-fit: contain; }"


@dataclass
class Example:
    label: str
    image: Image.Image
    question: str  # as --prompt takes it: data.prompt_template still goes around it
    references: list[str]


def examples(cfg: Config, split: str) -> list[Example]:
    """The first EXAMPLES usable rows of `split` of data.dataset that hold one image and no video
    (the page asks about one image), each with its question and reference answers."""
    ds = head(load_split(cfg.data, split, streaming=cfg.data.streaming), EXAMPLES)
    found = []
    for index, row, media, dialog in samples(ds, list(range(len(ds))), cfg.data, get_family(cfg.model.family)):
        if len(media) != 1 or isinstance(media[0], Video):
            continue
        # A conversation's first user turn is its question; a templated row's is its question column,
        # not prompt_of's text, which the page's prompt_of would wrap in the template a second time.
        question = (dialog[0][0] if cfg.data.conversations_column
                    else message_text(row.get(cfg.data.question_column))) or ""
        found.append(Example(f"{split} row {index}: {question}", media[0], question, references_of(cfg.data, row)))
    return found


def reply(cfg: Config, built: Built, image: Image.Image, prompt: str, **settings) -> str:
    """One answer to `prompt` about `image`, `settings` being generate's: evaluate.answer's batch and
    decoding, which are greedy only (GRPO's sampling builds its batch the same way)."""
    check_samples(built.family, [[image]], [[(prompt, "")]], cfg.data.system_prompt)
    batch = built.family.generation_batch(built.processor, [[image]], [prompt], system=cfg.data.system_prompt)
    new_tokens = generated(cfg, built, batch, **settings)
    return built.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


def answers(cfg: Config, built: Built, image: str | None, question: str, max_new_tokens: int, sample: bool,
            temperature: float, top_p: float) -> tuple[str, str]:
    """(the base model's answer, the fine-tuned one) to `question` about the image file `image`,
    what infer.py answers without and with --checkpoint when `sample` is off. Bad input is a
    gr.Error, which the page shows as a message."""
    if image is None:
        raise gr.Error("no image: upload one, or pick a row of the eval split")
    if not question.strip():
        raise gr.Error("no question: type one")
    # top_k=0: a checkpoint's generation_config may set top_k (50 by default), which would sample
    # from fewer tokens than temperature and top_p say.
    settings = {"max_new_tokens": int(max_new_tokens), "do_sample": sample,
                **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {})}
    try:
        picture, prompt = read_image(image), prompt_of(cfg.data, {cfg.data.question_column: question})
        with LOCK:
            tuned = reply(cfg, built, picture, prompt, **settings)
            with adapters_off(built.model):
                base = reply(cfg, built, picture, prompt, **settings)
    except ValueError as e:  # ConfigError and BadSample among them: a message naming the fix
        raise gr.Error(str(e)) from None
    return base, tuned


def run_dir(checkpoint: str | Path) -> Path:
    """The run a checkpoint was saved by. save_checkpoint writes <output_dir>/checkpoints/step-N and
    points <output_dir>/last and best at it: resolved first, both `last` and the step's own path lead
    to <output_dir>. Any other folder (an adapter copied elsewhere) is taken as its own run."""
    save = Path(checkpoint).resolve()
    return save.parent.parent if save.parent.name == "checkpoints" else save


def run_view(checkpoint: str | Path) -> tuple[Image.Image | None, str]:
    """(curves.png, metrics.json as a Markdown table) of the checkpoint's run, a line for each that
    is not written yet (train.py writes both at the end; curves.png also at each evaluation)."""
    run = run_dir(checkpoint)
    curves, metrics = run / "curves.png", run / "metrics.json"
    text = f"Run directory: `{run}`\n\n" + ("" if curves.exists() else "no curves.png yet\n\n")
    if metrics.exists():
        rows = json.loads(metrics.read_text()).items()
        text += "| metrics.json | |\n|---|---|\n" + "".join(
            f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |\n" for k, v in rows)
    else:
        text += "no metrics.json yet"
    # read_image, not the path: gradio serves only files under the working directory or the temp dir
    return (read_image(curves) if curves.exists() else None), text


def page(cfg: Config, built: Built, checkpoint: str, rows: list[Example]) -> gr.Blocks:
    """The two tabs. elem_id names what tests/test_web.py drives."""
    # analytics off: the page is local, and on a machine without network each report would wait to time out
    with gr.Blocks(title="minivlm", analytics_enabled=False) as blocks:
        gr.Markdown(f"## `{checkpoint}` beside its base model `{cfg.model.name_or_path}`")
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column():
                    # format="png": an example's pixels reach the model as they are (the default, webp, is lossy)
                    image = gr.Image(type="filepath", format="png", sources=["upload", "clipboard"], label="image",
                                     height=320, elem_id="image")
                    pick = gr.Dropdown([r.label for r in rows], type="index", value=None, label="or a row of the "
                                       "eval split (its first rows)", visible=bool(rows), elem_id="example")
                    reference = gr.Textbox(label="its reference answer(s)", interactive=False, visible=bool(rows),
                                           elem_id="reference")
                with gr.Column():
                    question = gr.Textbox(label="question", placeholder="what color is the shape", elem_id="question")
                    with gr.Accordion("generation", open=True):
                        max_new_tokens = gr.Slider(1, max(256, cfg.train.max_new_tokens), cfg.train.max_new_tokens,
                                                   step=1, label="max new tokens (train.max_new_tokens, as infer.py)")
                        sample = gr.Checkbox(False, label="sample (off: greedy, as infer.py and the evaluations)")
                        with gr.Row():
                            temperature = gr.Slider(0.05, 2.0, 1.0, step=0.05, label="temperature (sampling)")
                            top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="top-p (sampling)")
                    ask = gr.Button("Ask both", variant="primary", elem_id="ask")
                    with gr.Row():
                        base = gr.Textbox(label="base model (adapters off)" if not cfg.lora.train_modules else
                                          f"adapters off, lora.train_modules {cfg.lora.train_modules} as trained",
                                          interactive=False, elem_id="base-answer")
                        tuned = gr.Textbox(label="fine-tuned (base + adapter)", interactive=False,
                                           elem_id="tuned-answer")
        with gr.Tab("Run", elem_id="run-tab") as run_tab:
            curves_png, metrics = run_view(checkpoint)
            curves = gr.Image(curves_png, format="png", label="curves.png", interactive=False, elem_id="curves")
            table = gr.Markdown(metrics, elem_id="metrics")

        inputs = [image, question, max_new_tokens, sample, temperature, top_p]
        for event in (ask.click, question.submit):
            event(functools.partial(answers, cfg, built), inputs, [base, tuned])
        pick.input(lambda i: (rows[i].image, rows[i].question, " | ".join(rows[i].references), "", ""), pick,
                   [image, question, reference, base, tuned])
        run_tab.select(lambda: run_view(checkpoint), None, [curves, table])
    return blocks


def serve(cfg: Config, built: Built, checkpoint: str, rows: list[Example], host: str, port: int) -> None:
    """Serve the page on http://host:port until Ctrl-C."""
    try:
        page(cfg, built, checkpoint, rows).launch(server_name=host, server_port=port, footer_links=[], css=CSS)
    except OSError:  # gradio's own words name its launch() arguments and environment variables
        raise ConfigError(f"cannot serve on {host}:{port}: the port is taken, or the address is not this "
                          "machine's; pick another --port or --host") from None
