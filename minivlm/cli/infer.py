"""Answer questions about images with a base model and (optionally) a trained adapter.

    python infer.py --config configs/demo.toml --checkpoint runs/demo/last \\
                    --image img.png --prompt "what color is the shape"          # one image
    python infer.py ... --image photos/ --prompt "what is shown"                # every image in a folder
    python infer.py ... --image a.png b.png --prompt "<image> or <image>: which is red"  # one sample, two images
    python infer.py ... --video clip.mp4 --prompt "what happens"                   # a video (or a folder of frames)
    python infer.py ... --split test --eval --out answers.jsonl                 # a split of data.dataset
    python infer.py ... --web                      # a page on http://127.0.0.1:7860: base and fine-tuned side by side

--prompt is the question; it goes through data.prompt_template. Several --image files are one
sample's images, placed at the prompt's <image> markers (or all before it); --video adds a video to that
sample (after its images), sampled by data.video_frames / data.video_fps. With --split, the questions
and references come from the dataset, and --eval prints data.metric. --out writes one JSON
line per answer. --web (pip install 'minivlm[web]') serves a page instead (minivlm/web.py): its questions
are asked there, its examples come from --split (default data.eval_split).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Only light imports up here: torch, transformers and datasets take seconds, and --help or a
# mistake in the arguments or config should answer at once. They are imported in main().
from minivlm import plain_warnings
from minivlm.config import Config, ConfigError, check_output_path, load_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
BATCH_SIZE = 16


def image_files(path: Path) -> list[Path]:
    """`path` itself, or the image files in the folder `path` (sorted); nothing is opened yet."""
    if not path.exists():
        raise ConfigError(f"--image {path} not found")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    return files


def image_batches(files: list[Path], batch_size: int = BATCH_SIZE) -> Iterator[list[tuple[Path, object]]]:
    """(file, RGB image) batches, each opened and decoded only when it is asked for: a folder of
    thousands of images costs one batch of memory and no open file handles (to_rgb decodes in
    full, which closes the file). An unreadable file is skipped with a warning naming it."""
    from minivlm.data import BadSample, read_image

    for start in range(0, len(files), batch_size):
        batch = []
        for f in files[start:start + batch_size]:
            try:
                batch.append((f, read_image(f)))
            except BadSample as e:
                warnings.warn(f"skipped {f}: {e}")
        if batch:
            yield batch


def prompt_for(cfg: Config, question: str) -> str:
    """The question through data.prompt_template, or a ConfigError if the template reads other columns."""
    from minivlm.data import prompt_of
    try:
        return prompt_of(cfg.data, {cfg.data.question_column: question})
    except KeyError as e:
        raise ConfigError(f"data.prompt_template reads column {e} that a single question cannot fill; "
                          "override it, e.g. --set data.prompt_template='{question}'") from None


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="a directory written by train.py; omit to ask the base model")
    ap.add_argument("--image", nargs="+", help="an image file, a folder of them (each answered by itself), or "
                    "several files (one sample's images)")
    ap.add_argument("--video", help="a video file, or a folder of its frames: one sample's video, after its --image "
                    "files if any")
    ap.add_argument("--split", help="a split of data.dataset, e.g. test or validation[:100]")
    ap.add_argument("--prompt", help="the question (with --image or --video)")
    ap.add_argument("--eval", action="store_true", help="with --split: print data.metric against the references")
    ap.add_argument("--out", help="write the answers as JSONL here")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--web", action="store_true", help="serve a page that asks the base model and --checkpoint side "
                    "by side (needs gradio: pip install 'minivlm[web]')")
    ap.add_argument("--host", default="127.0.0.1", help="with --web: the address to serve on (0.0.0.0: every "
                    "interface, open to the network)")
    ap.add_argument("--port", type=int, default=7860, help="with --web: the port to serve on")
    args = ap.parse_args(argv)
    plain_warnings()
    asked = bool(args.image or args.video)  # a question of our own, not the dataset's
    try:
        if args.web:
            if not args.checkpoint:
                raise ConfigError("--web shows the base model beside a trained adapter: give --checkpoint")
            if asked or args.prompt or args.eval or args.out:
                raise ConfigError("--web takes its image and question on the page: drop --image, --video, --prompt, "
                                  "--eval and --out")
        elif asked == bool(args.split):
            raise ConfigError("give --image and/or --video with --prompt, or --split")
        if asked and not args.prompt:
            raise ConfigError(f"{'--image' if args.image else '--video'} needs --prompt, the question to ask")
        if args.eval and not args.split:
            raise ConfigError("--eval needs --split: the references come from the dataset")
        if args.out:
            check_output_path(args.out, "--out", directory=False)
        cfg = load_config(args.config, args.set)
        if args.web:  # before the seconds a model takes to load, as every check here
            try:
                from minivlm import web
            except ModuleNotFoundError as e:
                if e.name != "gradio":
                    raise
                raise ConfigError("--web needs gradio: pip install 'minivlm[web]'") from None
            prompt_for(cfg, "")  # the page's questions go through data.prompt_template too
            split = args.split or cfg.data.eval_split
            rows = web.examples(cfg, split) if split else []
        files = [f for name in args.image or [] for f in image_files(Path(name))]
        # several files, or a video: one sample; a folder: a sample each
        together = len(args.image or []) > 1 or bool(args.video)
        if args.video:
            cfg.data.video_column = cfg.data.video_column or "video"  # the family is asked whether it reads video
        from minivlm.build import build
        from minivlm.checkpoint import load_adapter, write_atomic
        from minivlm.data import load_scored, read_image, video_of
        from minivlm.evaluate import answer, evaluate
        from minivlm.models.chat import IMAGE, VIDEO
        if asked:
            if len(files) == 1 or together:  # one sample: a bad file is the whole job; say so before loading
                images = [read_image(f) for f in files]  # a BadSample, which is a ConfigError, names it
            if args.video:  # as a row's video: a file, or a list of frames; a path as given, not under data.image_root
                video = Path(args.video).resolve()
                if not video.exists():
                    raise ConfigError(f"--video {args.video} not found")
                images.append(video_of(cfg.data, {cfg.data.video_column: image_files(video) if video.is_dir()
                                                  else str(video)}))
            prompt = prompt_for(cfg, args.prompt)
            marked = prompt.count(IMAGE)
            if marked not in (0, len(files) if together else 1) or prompt.count(VIDEO) not in (0, bool(args.video)):
                raise ConfigError(f"the prompt has {marked} {IMAGE} and {prompt.count(VIDEO)} {VIDEO} marker(s) for "
                                  f"{len(files) if together else 1} image(s) and {int(bool(args.video))} video per "
                                  "sample: mark each, or none (all go before the prompt)")
        elif not args.web:
            ds = load_scored(cfg.data, args.split)
        built = build(cfg)
        if args.checkpoint:
            load_adapter(args.checkpoint, built.model)
        if args.web:
            web.serve(cfg, built, args.checkpoint, rows, args.host, args.port)  # until Ctrl-C
            return []
    except (ConfigError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")

    if asked and together:
        rows = [{"images": [str(f) for f in files], **({"video": args.video} if args.video else {}), "prompt": prompt,
                 "answer": answer(cfg, built, [images], [prompt])[0]}]
    elif asked:
        rows = [{"image": str(f), "prompt": prompt, "answer": text}
                for batch in image_batches(files)
                for (f, _), text in zip(batch, answer(cfg, built, [[im] for _, im in batch], [prompt] * len(batch)))]
    else:
        scored = evaluate(cfg, built, ds)
        rows = [{"index": i, "prompt": p, "answer": a, "references": r}
                for i, (p, a, r) in enumerate(zip(scored["prompts"], scored["predictions"], scored["references"]))]
    for row in rows:
        print(row["answer"] if asked and len(rows) == 1 else json.dumps(row))
    if args.eval:
        print(f"{scored['metric']}: {scored['score']:.4f} on {scored['n']} samples")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows).encode())
    return rows


if __name__ == "__main__":
    main()
