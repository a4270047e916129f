"""Write the demo's fine-tuning data: shape images with questions the base model never saw.

    python demo/make_data.py --out data/shapes-qa      (or: make data)

The layout is the `datasets` imagefolder one (images + metadata.jsonl per split), loaded with
`datasets.load_dataset("imagefolder", data_dir=...)`: the same path a user's own data takes.
Test images come from another seed than training images, so accuracy is measured on
images the fine-tune never saw.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import QUESTIONS, sample  # noqa: E402


def write_split(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(n):
            image, attrs = sample(rng)
            question = rng.choice(list(QUESTIONS))
            image.save(folder / f"{i:05d}.png")
            meta.write(json.dumps({"file_name": f"{i:05d}.png", "question": question,
                                   "answer": attrs[QUESTIONS[question]]}) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/shapes-qa"))
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    write_split(args.out / "train", args.train, seed=1000)
    write_split(args.out / "test", args.test, seed=2000)
    print(f"wrote {args.train} train and {args.test} test samples to {args.out}")
