"""Write fine-tuning data for the tiny base, as `datasets` imagefolders.

    python demo/make_data.py --out data/shapes-qa                  (or: make data) the demo
    python demo/make_data.py --task digits --out data/digits       (part of: make digits)
    python demo/make_data.py --task prefs --out data/shapes-prefs  (part of: make dpo-demo)
    python demo/make_data.py --task en --out data/shapes-en        (part of: make grpo-demo)
    python demo/make_data.py --task pairs --out data/shapes-pairs  (part of: make pairs-demo)
    python demo/make_data.py --task clips --out data/shapes-clips  (part of: make video-demo)

shapes-qa: shape images with questions the base model never saw. digits: one digit an image,
drawn with varying size, place, slant, stroke and brightness, asked "what digit is this" and
answered "0" to "9": a stand-in for scikit-learn's handwritten digits, built without
downloading anything, in words the base never wrote before (a tokenizer without digits would
make every answer <unk>). prefs: preference pairs for DPO: asked a bare "caption" (neither
"caption en" nor "caption es", which the base was pretrained on), the English caption is chosen
and the Spanish one rejected. The base prefers the opposite: it finds the Spanish caption the more
likely one for about 9 images in 10 (docs/log.md), so DPO has a preference to reverse. en: the
prompt "en" alone, for GRPO: the base, pretrained on "caption en", writes an English caption to it,
but mostly a wrong one (docs/log.md). Its rows hold the caption's colour, shape and position,
which demo/rewards.py checks; no caption is ever a label. pairs: two images a sample, exactly one
of them holding a red shape, asked "which image has the red shape" and answered "first" or
"second": a question no single image answers, in words the base never wrote. It is written in
LLaVA's JSON layout (a list of {"images": [...], "conversations": [...]}, each image placed by an
<image> marker), train rows then test rows in one file. clips: a 4-frame video a sample (an .mp4
file, written with PyAV), the shape in one quadrant for two frames and in the next quadrant over
for two, asked "where does the shape move" and answered with the side it moves to, "left", "right",
"top" or "bottom": no single frame answers it, and the order of the frames does. JSON Lines, train rows then test rows.

The layout (but pairs') is the `datasets` imagefolder one (images + metadata.jsonl per split), loaded with
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

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.shapes import COLORS, POSITIONS, QUESTIONS, SHAPES, SIZE, caption, draw, draw_digit, sample  # noqa: E402


def shapes_qa(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    image, attrs = sample(rng)
    question = rng.choice(list(QUESTIONS))
    return image, {"question": question, "answer": attrs[QUESTIONS[question]]}


def digits(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    digit = rng.randrange(10)
    return draw_digit(digit, rng), {"question": "what digit is this", "answer": str(digit)}


def prefs(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    image, attrs = sample(rng)
    return image, {"question": "caption", "chosen": caption(attrs, "en"), "rejected": caption(attrs, "es")}


# GRPO learns only what its samples find. Asked "en", the base never names the top right corner
# for a top-right image (0 of 512 samples), and even asked its own "caption en" it tells a 12-pixel
# circle from a square only about 9 times in 10, a ceiling no training of the language model lifts
# (docs/log.md). The en task leaves both out, so that what it measures is what GRPO teaches.
EN_SHAPES = ["circle", "triangle"]
EN_POSITIONS = ["top left", "bottom left", "bottom right"]


def en(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    attrs = {"color": rng.choice(list(COLORS)), "shape": rng.choice(EN_SHAPES), "position": rng.choice(EN_POSITIONS)}
    image = draw(attrs["color"], attrs["shape"], attrs["position"], rng)
    return image, {"question": "en", "caption": caption(attrs, "en"), **attrs}


def pair(rng: random.Random) -> tuple[list[Image.Image], str]:
    """Two shape images, exactly one of them red; the answer says which."""
    red = rng.randrange(2)
    images = []
    for i in range(2):
        color = "red" if i == red else rng.choice([c for c in COLORS if c != "red"])
        images.append(draw(color, rng.choice(SHAPES), rng.choice(POSITIONS), rng))
    return images, ["first", "second"][red]


def write_pairs(out: Path, n_train: int, n_test: int, seed: int = 9000) -> None:
    """LLaVA's JSON layout: out/pairs.json and the images under out/images; rows [0, n_train) from
    one seed, the n_test after them from another, so the test images are new to training."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for start, n, rng in ((0, n_train, random.Random(seed)), (n_train, n_test, random.Random(seed + 1))):
        for i in range(start, start + n):
            images, answer = pair(rng)
            names = [f"images/{i:05d}_{k}.png" for k in range(2)]
            for image, name in zip(images, names):
                image.save(out / name)
            rows.append({"id": i, "images": names, "conversations": [
                {"from": "human", "value": "<image>\n<image>\nwhich image has the red shape"},
                {"from": "gpt", "value": answer}]})
    (out / "pairs.json").write_text(json.dumps(rows))


# A clip's move, named by the side it moves to (words the base already writes, one token each):
# (from, to) quadrants, two of each. Starting top left, it may move right or down (to the bottom).
MOVES = {"right": [("top left", "top right"), ("bottom left", "bottom right")],
         "left": [("top right", "top left"), ("bottom right", "bottom left")],
         "bottom": [("top left", "bottom left"), ("top right", "bottom right")],
         "top": [("bottom left", "top left"), ("bottom right", "top right")]}


def clip(rng: random.Random) -> tuple[list[Image.Image], str]:
    """Four frames of one shape on one background (each drawn from the same seed), in its first
    quadrant for frames 0-1 and its second for 2-3: Qwen-VL's frame pairs each see one place."""
    direction = rng.choice(list(MOVES))
    start, end = rng.choice(MOVES[direction])
    color, shape, seed = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randrange(2 ** 31)
    return [draw(color, shape, where, random.Random(seed)) for where in (start, start, end, end)], direction


def write_clips(out: Path, n_train: int, n_test: int, seed: int = 9500) -> None:
    """out/clips.jsonl, {"video": "clips/00000.mp4", "question", "answer"} per row, and the clips,
    MPEG-4 at 2 fps (near-lossless: qscale 1); rows [0, n_train) from one seed, the rest another."""
    import av  # only this task writes video

    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for start, n, rng in ((0, n_train, random.Random(seed)), (n_train, n_test, random.Random(seed + 1))):
        for i in range(start, start + n):
            frames, direction = clip(rng)
            name = f"clips/{i:05d}.mp4"
            with av.open(str(out / name), "w") as container:
                stream = container.add_stream("mpeg4", rate=2, options={"qscale": "1"})
                stream.width = stream.height = SIZE
                stream.pix_fmt = "yuv420p"
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_image(frame)))
                container.mux(stream.encode())
            rows.append({"video": name, "question": "<video> where does the shape move", "answer": direction})
    (out / "clips.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


# Each task: (one sample's image and metadata columns, train seed, test seed).
TASKS = {"shapes-qa": (shapes_qa, 1000, 2000), "digits": (digits, 3000, 4000), "prefs": (prefs, 5000, 6000),
         "en": (en, 7000, 8000)}


def write_split(folder: Path, n: int, seed: int, task: str = "shapes-qa") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(n):
            image, columns = TASKS[task][0](rng)
            image.save(folder / f"{i:05d}.png")
            meta.write(json.dumps({"file_name": f"{i:05d}.png", **columns}) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted([*TASKS, "pairs", "clips"]), default="shapes-qa")
    ap.add_argument("--out", type=Path, default=Path("data/shapes-qa"))
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    if args.task == "pairs":
        write_pairs(args.out, args.train, args.test)
        print(f"wrote {args.train} train and {args.test} test pairs to {args.out}/pairs.json")
        sys.exit()
    if args.task == "clips":
        write_clips(args.out, args.train, args.test)
        print(f"wrote {args.train} train and {args.test} test clips to {args.out}/clips.jsonl")
        sys.exit()
    _, train_seed, test_seed = TASKS[args.task]
    write_split(args.out / "train", args.train, train_seed, args.task)
    write_split(args.out / "test", args.test, test_seed, args.task)
    print(f"wrote {args.train} train and {args.test} test {args.task} samples to {args.out}")
