"""Write a digits dataset: answers the embedded base never wrote, to show it can learn a user's words.

    python demo/make_digits.py --out data/digits      (or: make digits)

Each image is one digit, drawn with varying size, place, slant, stroke and brightness, asked
"what digit is this" and answered "0" to "9": a stand-in for scikit-learn's handwritten digits,
built without downloading anything. The base pretrained on shape captions; a tokenizer
without digits would turn every answer into <unk>.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 32


def draw_digit(digit: int, rng: random.Random) -> Image.Image:
    """Light on dark, roughly centred, in a random size, slant and brightness: about as varied as
    scikit-learn's handwritten digits (8×8 scans), which this base reads about as well."""
    glyph = Image.new("L", (SIZE, SIZE), 0)
    font = ImageFont.load_default(size=rng.randint(22, 28))
    centre = (SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2))
    ImageDraw.Draw(glyph).text(centre, str(digit), fill=rng.randint(180, 255), font=font, anchor="mm",
                               stroke_width=rng.randint(2, 3), stroke_fill=255)
    return glyph.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR).convert("RGB")


def write_split(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(n):
            digit = rng.randrange(10)
            draw_digit(digit, rng).save(folder / f"{i:05d}.png")
            meta.write(json.dumps({"file_name": f"{i:05d}.png", "question": "what digit is this",
                                   "answer": str(digit)}) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/digits"))
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    write_split(args.out / "train", args.train, seed=3000)
    write_split(args.out / "test", args.test, seed=4000)
    print(f"wrote {args.train} train and {args.test} test digits to {args.out}")
