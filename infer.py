"""Answer questions about images with a base model and (optionally) a trained adapter.

    python infer.py --config configs/demo.toml --checkpoint runs/demo/last \\
                    --image img.png --prompt "what color is the shape"          # one image
    python infer.py ... --image photos/ --prompt "what is shown"                # every image in a folder
    python infer.py ... --image a.png b.png --prompt "<image> or <image>: which is red"  # one sample, two images
    python infer.py ... --split test --eval --out answers.jsonl                 # a split of data.dataset

--prompt is the question; it goes through data.prompt_template. Several --image files are one
sample's images, placed at the prompt's <image> markers (or all before it). With --split, the questions
and references come from the dataset, and --eval prints data.metric. --out writes one JSON
line per answer.
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
from minivlm.config import ConfigError, check_output_path, load_config

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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="a directory written by train.py; omit to ask the base model")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="an image file, a folder of them (each answered by itself), or "
                        "several files (one sample's images)")
    source.add_argument("--split", help="a split of data.dataset, e.g. test or validation[:100]")
    ap.add_argument("--prompt", help="the question (with --image)")
    ap.add_argument("--eval", action="store_true", help="with --split: print data.metric against the references")
    ap.add_argument("--out", help="write the answers as JSONL here")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    plain_warnings()
    try:
        if args.image and not args.prompt:
            raise ConfigError("--image needs --prompt, the question to ask")
        if args.eval and not args.split:
            raise ConfigError("--eval needs --split: the references come from the dataset")
        if args.out:
            check_output_path(args.out, "--out", directory=False)
        cfg = load_config(args.config, args.set)
        if args.image:
            files = [f for name in args.image for f in image_files(Path(name))]
            together = len(args.image) > 1  # several files: one sample; a folder: a sample each
        from minivlm.build import build
        from minivlm.checkpoint import load_adapter, write_atomic
        from minivlm.data import load_scored, prompt_of, read_image
        from minivlm.evaluate import answer, evaluate
        from minivlm.models.chat import IMAGE
        if args.image:
            if len(files) == 1 or together:  # one sample: a bad file is the whole job; say so before loading
                images = [read_image(f) for f in files]  # a BadSample, which is a ConfigError, names it
            try:
                prompt = prompt_of(cfg.data, {cfg.data.question_column: args.prompt})
            except KeyError as e:
                raise ConfigError(f"data.prompt_template reads column {e} that a single question cannot fill; "
                                  "override it, e.g. --set data.prompt_template='{question}'") from None
            marked = prompt.count(IMAGE)
            if marked not in (0, len(files) if together else 1):
                raise ConfigError(f"the prompt has {marked} {IMAGE} marker(s) for {len(files) if together else 1} "
                                  "image(s) per sample: mark each image, or none (all go before the prompt)")
        else:
            ds = load_scored(cfg.data, args.split)
        built = build(cfg)
        if args.checkpoint:
            load_adapter(args.checkpoint, built.model)
    except (ConfigError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")

    if args.image and together:
        rows = [{"images": [str(f) for f in files], "prompt": prompt,
                 "answer": answer(cfg, built, [images], [prompt])[0]}]
    elif args.image:
        rows = [{"image": str(f), "prompt": prompt, "answer": text}
                for batch in image_batches(files)
                for (f, _), text in zip(batch, answer(cfg, built, [[im] for _, im in batch], [prompt] * len(batch)))]
    else:
        scored = evaluate(cfg, built, ds)
        rows = [{"index": i, "prompt": p, "answer": a, "references": r}
                for i, (p, a, r) in enumerate(zip(scored["prompts"], scored["predictions"], scored["references"]))]
    for row in rows:
        print(row["answer"] if args.image and len(rows) == 1 else json.dumps(row))
    if args.eval:
        print(f"{scored['metric']}: {scored['score']:.4f} on {scored['n']} samples")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows).encode())
    return rows


if __name__ == "__main__":
    main()
