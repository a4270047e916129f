"""Synthetic images for the embedded demo: one coloured shape in one quadrant of a 32×32 image.

Everything is a function of an integer seed, so the base model and the demo data rebuild
bit for bit. The base model learns to *caption* these images, in English or Spanish as its
prompt asks, like PaliGemma's "caption en" / "caption es" prefixes:

    "caption en" -> "red circle top left"        "caption es" -> "circulo rojo arriba izquierda"

Two prompt-dependent tasks teach the base that its prompt matters. The demo then teaches it,
with QLoRA, to *answer questions* about the images, which it never saw; `make digits` to read
digits drawn by `draw_digit` and answer with words it never wrote before fine-tuning.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220),
          "yellow": (230, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
SIZE = 32

SPANISH = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
           "white": "blanco", "circle": "circulo", "square": "cuadrado", "triangle": "triangulo",
           "top": "arriba", "bottom": "abajo", "left": "izquierda", "right": "derecha"}
CAPTION_PROMPTS = {"caption en": "en", "caption es": "es"}

# The demo's new skill: three question types the base never saw.
QUESTIONS = {"what color is the shape": "color", "what shape is it": "shape", "where is the shape": "position"}


def draw(color: str, shape: str, position: str, rng: random.Random) -> Image.Image:
    """One shape, 12-14 px across, jittered inside its 16-px quadrant, on a dark noisy background."""
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    s = rng.randint(12, 14)
    half = SIZE // 2
    x0 = (half if "right" in position else 0) + rng.randint(1, half - s - 1)
    y0 = (half if "bottom" in position else 0) + rng.randint(1, half - s - 1)
    box = [x0, y0, x0 + s, y0 + s]
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    return img


def sample(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    attrs = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "position": rng.choice(POSITIONS)}
    return draw(attrs["color"], attrs["shape"], attrs["position"], rng), attrs


def caption(attrs: dict[str, str], lang: str = "en") -> str:
    if lang == "en":
        return f"{attrs['color']} {attrs['shape']} {attrs['position']}"
    position = " ".join(SPANISH[w] for w in attrs["position"].split())
    return f"{SPANISH[attrs['shape']]} {SPANISH[attrs['color']]} {position}"  # noun before adjective


VOCAB = sorted({w for text in [*COLORS, *SHAPES, *POSITIONS, *QUESTIONS, *CAPTION_PROMPTS, *SPANISH.values()]
                for w in text.split()})


def draw_digit(digit: int, rng: random.Random) -> Image.Image:
    """Light on dark, roughly centred, in a random size, slant and brightness: about as varied as
    scikit-learn's handwritten digits (8×8 scans), which this base reads about as well."""
    glyph = Image.new("L", (SIZE, SIZE), 0)
    font = ImageFont.load_default(size=rng.randint(22, 28))
    centre = (SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2))
    ImageDraw.Draw(glyph).text(centre, str(digit), fill=rng.randint(180, 255), font=font, anchor="mm",
                               stroke_width=rng.randint(2, 3), stroke_fill=255)
    return glyph.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR).convert("RGB")
