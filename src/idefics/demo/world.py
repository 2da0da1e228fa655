"""The demo model's world: one filled shape on a plain square canvas, and the questions it answers about it.

A scene is a square RGB canvas of 64-512 px with a uniform background (each channel in [200, 255]) and exactly one
filled circle, square or triangle (apex up) in one of six colours, each channel jittered by up to ±20. The shape's
bounding box is a square whose side is 25-60% of the canvas, anywhere fully inside it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
CANVAS_SIZES = (64, 512)  # smallest and largest canvas side, in pixels
BOX_FRACTIONS = (0.25, 0.60)  # smallest and largest bounding-box side, as a fraction of the canvas side
JITTER = 20  # each colour channel moves by up to this much
BACKGROUND = (200, 255)  # range of each background channel

# question -> how the answer is built from the scene; the assistant's reply, without the leading space
QUESTIONS = {
    "What color is the shape?": lambda s: f"{s.color.capitalize()}.",
    "What shape is this?": lambda s: f"A {s.shape}.",
    "Describe the image.": lambda s: f"A {s.color} {s.shape}.",
}


@dataclass(frozen=True)
class Scene:
    size: int  # canvas side, in pixels
    background: tuple[int, int, int]
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    rgb: tuple[int, int, int]  # the jittered colour the shape is drawn in
    box: tuple[int, int, int]  # (left, top, side) of the shape's bounding box, in pixels

    def answer(self, question: str) -> str:
        """The reply to one of QUESTIONS, e.g. "A red circle."."""
        if question not in QUESTIONS:
            raise ValueError(f"unknown question {question!r}; the demo world knows {list(QUESTIONS)}")
        return QUESTIONS[question](self)


def random_scene(rng: random.Random, *, size: int | None = None) -> Scene:
    """A scene drawn uniformly from the world; `size` fixes the canvas side (else uniform in CANVAS_SIZES)."""
    size = rng.randint(*CANVAS_SIZES) if size is None else size
    if not CANVAS_SIZES[0] <= size <= CANVAS_SIZES[1]:
        raise ValueError(f"canvas size must be in {list(CANVAS_SIZES)}, got {size}")
    background = tuple(rng.randint(*BACKGROUND) for _ in range(3))
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLORS[color])
    side = rng.randint(round(BOX_FRACTIONS[0] * size), int(BOX_FRACTIONS[1] * size))
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    return Scene(size, background, shape, color, rgb, (left, top, side))


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image of scene.size × scene.size."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    left, top, side = scene.box
    right, bottom = left + side - 1, top + side - 1  # PIL's boxes include their last pixel
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=scene.rgb)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=scene.rgb)
    else:
        draw.polygon([(left + (side - 1) / 2, top), (left, bottom), (right, bottom)], fill=scene.rgb)
    return image
