"""Answer one question about one image with a base model and (optionally) a trained adapter.

    python infer.py --config configs/demo.toml --checkpoint runs/demo/last \
                    --image img.png --prompt "what color is the shape"
"""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from minivlm.build import build
from minivlm.checkpoint import load_adapter
from minivlm.config import ConfigError, load_config
from minivlm.data import prompt_of
from minivlm.evaluate import answer


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="a directory written by train.py; omit to ask the base model")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True, help="the question; it goes through data.prompt_template")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        image = Image.open(args.image)
        built = build(cfg)
        if args.checkpoint:
            load_adapter(args.checkpoint, built.model)
    except (ConfigError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        prompt = prompt_of(cfg.data, {cfg.data.question_column: args.prompt})
    except KeyError as e:
        sys.exit(f"error: data.prompt_template reads column {e} that a single question cannot fill; "
                 "override it, e.g. --set data.prompt_template='{question}'")
    text = answer(cfg, built, [image], [prompt])[0]
    print(text)
    return text


if __name__ == "__main__":
    main()
