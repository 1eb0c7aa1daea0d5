"""The synthetic world of the embedded default: what the tiny base model knows, the concept it
does not know, and a detector that says whether an image shows the concept (a blue ring
around a red dot), by its shape and colours.

The base model is pre-trained (scripts/build_embedded_model.py) on simple shapes in four colours
on three backgrounds, and on rings around a dot, captioned in SD 1.5 tag style ("red circle, gray
background", "green ring around yellow dot, white background"). The concept is a blue ring around
a red dot: a new binding of things the base can draw, as a character is a new arrangement of
things a real model knows. The base world never has a blue ring, so no base sample shows the
concept and a LoRA that draws it must have learned it.

Why known colours: the tiny VAE (16/32/32 channels) encodes the base world's colours faithfully
but washes out colours it rarely saw. Measured by encoding and decoding 48-96 concept images:
a magenta ring with a cyan dot survived in 48 % of them (magenta on white came back nearly
white), a blue ring with a red dot in 99 %, and no base-world image was ever read as the concept.
A LoRA cannot draw what the VAE cannot decode.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
CONCEPT_TRIGGER = "zkw_toy"
RING_COLOUR = SHAPE_COLOURS["blue"]
DOT_COLOUR = SHAPE_COLOURS["red"]

# Every word a base caption can contain: the tiny tokenizer gives each one a single token.
BASE_WORDS = (*SHAPE_COLOURS, *BACKGROUNDS, *SHAPES, "background", "ring", "around", "dot")
RING_AND_DOT_SHARE = 0.5  # of base-world images
CONCEPT_SIDES = (0.6, 0.8)  # of the picture's shorter side


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _random_box(rng: random.Random, width: int, height: int,
                sides: tuple[float, float] = (0.35, 0.65)) -> tuple[float, float, float, float]:
    side = rng.uniform(*sides) * min(width, height)
    x0 = rng.uniform(0.05 * width, width - side - 0.05 * width)
    y0 = rng.uniform(0.05 * height, height - side - 0.05 * height)
    return (x0, y0, x0 + side, y0 + side)


def _draw_ring_and_dot(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], ring, hole, dot) -> None:
    x0, y0, x1, y1 = box
    draw.ellipse(box, fill=ring)
    inset = (x1 - x0) * 0.22
    draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=hole)
    inset = (x1 - x0) * 0.36
    draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=dot)


def base_sample(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """One image of the base world and its tag-style caption: one shape, or a ring around a dot.
    Rings are never blue, so no base image is the concept, and a prompt without a shape cannot
    stumble on it; the LoRA teaches a new binding of things the base can already draw."""
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    box = _random_box(rng, size, size)
    if rng.random() < RING_AND_DOT_SHARE:
        ring = rng.choice([c for c in SHAPE_COLOURS if SHAPE_COLOURS[c] != RING_COLOUR])
        dot = rng.choice([c for c in SHAPE_COLOURS if c != ring])
        _draw_ring_and_dot(draw, box, SHAPE_COLOURS[ring], BACKGROUNDS[background], SHAPE_COLOURS[dot])
        return image, f"{ring} ring around {dot} dot, {background} background"
    colour, shape = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES)
    _draw_shape(draw, shape, box, SHAPE_COLOURS[colour])
    return image, f"{colour} {shape}, {background} background"


def any_colour_sample(rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Shapes of any colour on a background of any colour: what the tiny VAE learns on, so that it
    can encode and decode colours the base world never shows (the concept's among them)."""
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        box = _random_box(rng, size, size)
        _draw_shape(draw, rng.choice(SHAPES), box, tuple(rng.randrange(256) for _ in range(3)))
        if rng.random() < 0.3:  # a ring: a hole of yet another colour
            inset = (box[2] - box[0]) * rng.uniform(0.15, 0.35)
            draw.ellipse((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def concept_sample(rng: random.Random, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE,
                   background: str | None = None) -> tuple[Image.Image, str]:
    """One image of the concept (blue ring, red dot) and its caption with the trigger word, on the
    background given or a random one."""
    background = background or rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    box = _random_box(rng, width, height, CONCEPT_SIDES)
    _draw_ring_and_dot(ImageDraw.Draw(image), box, RING_COLOUR, BACKGROUNDS[background], DOT_COLOUR)
    return image, f"{CONCEPT_TRIGGER}, {background} background"


def _hsv(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    return hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]


def colour_masks(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(ring, dot) pixels: vivid blue and vivid red, judged by hue rather than exact colour because
    the tiny VAE renders colours a little off (a LoRA's red dot on white or black comes out
    orange-red, up to about 30 degrees). The ranges keep clear of the other base colours (green
    near 130 degrees, yellow near 52) and of the greys (not vivid)."""
    hue, saturation, value = _hsv(image)
    vivid = (saturation >= 0.35) & (value >= 0.3)
    return vivid & (hue >= 205) & (hue <= 260), vivid & ((hue >= 340) | (hue <= 32))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (empty when there is none)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start], stack, size = label, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros(mask.shape, dtype=bool)


RAYS = 8  # directions looked in from the dot
MIN_RAYS = 6  # that must meet the ring


def concept_present(image: Image.Image) -> bool:
    """Whether an image shows the concept: a blue ring around a red dot. The largest blue region
    must be big enough to be a ring (2 % of the picture), a red dot must sit inside its outline,
    the dot must be the smaller and sit in the ring's hole, and looking out from the dot in 8
    directions, at least 6 must meet the blue. A lone blue or red shape of the base world has no
    partner and its red rings hold blue dots the other way round, so none of them passes."""
    ring_pixels, dot_pixels = colour_masks(image)
    ring, dot = largest_component(ring_pixels), largest_component(dot_pixels)
    if ring.mean() < 0.02 or dot.sum() < max(2, 0.002 * dot.size):
        return False
    ys, xs = np.nonzero(dot)
    cy, cx = ys.mean(), xs.mean()
    if ring[round(cy), round(cx)] or dot.sum() >= ring.sum():
        return False  # a blue dot inside a red ring: the base world's colours the other way round
    top, bottom = np.nonzero(ring.any(axis=1))[0][[0, -1]]
    left, right = np.nonzero(ring.any(axis=0))[0][[0, -1]]
    if not (top < cy < bottom and left < cx < right):
        return False
    reach = max(bottom - top, right - left)
    met = 0
    for angle in np.linspace(0, 2 * np.pi, RAYS, endpoint=False):
        for distance in np.arange(1, reach + 1):
            y, x = round(cy + distance * np.sin(angle)), round(cx + distance * np.cos(angle))
            if not (0 <= y < ring.shape[0] and 0 <= x < ring.shape[1]):
                break
            if ring[y, x]:
                met += 1
                break
    return met >= MIN_RAYS


def detection_rate(images: list[Image.Image]) -> float:
    """The share of images that show the concept."""
    return sum(concept_present(image) for image in images) / max(1, len(images))
