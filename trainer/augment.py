"""Augmentations: horizontal flip, colour jitter and random crop, drawn as captions are varied
(trainer/captions.py): from the run's seed and the batch's number alone, so a resumed run sees
the same augmented images as an unbroken one.

Each image has a fixed set of `VARIANTS` variants (as OneTrainer caches "variations"); each time
it is drawn, one of them is picked. A variant is a finite, repeatable thing, so its latents are
encoded once and reused under their own cache key (with the latent cache on): a flipped image is
encoded once, never silently skipped, and the cache's hit rate says how often it was reused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

VARIANTS = 8  # per image: enough variety for a LoRA's few thousand steps, few enough to reuse each
MAX_ZOOM = 1.2  # random crop: the image covers the bucket at up to this scale, and a part of it is kept


@dataclass(frozen=True)
class Variant:
    """What is done to one image: mirror it, scale brightness, contrast and saturation (1 = as is),
    cover the bucket at `zoom` times, and crop at (crop_x, crop_y), each 0-1 of the slack."""

    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    zoom: float = 1.0
    crop_x: float = 0.5
    crop_y: float = 0.5

    def key(self) -> str:
        """The variant in a cache key ("" for the image as it is, so plain runs keep their keys)."""
        return "" if self == PLAIN else repr(self)

    def colour(self, image: Image.Image) -> Image.Image:
        if (self.brightness, self.contrast, self.saturation) == (1.0, 1.0, 1.0):
            return image
        image = ImageEnhance.Brightness(image).enhance(self.brightness)
        image = ImageEnhance.Contrast(image).enhance(self.contrast)
        return ImageEnhance.Color(image).enhance(self.saturation)

    def mirror(self, image: Image.Image) -> Image.Image:
        return ImageOps.mirror(image) if self.flip else image


PLAIN = Variant()


@dataclass(frozen=True)
class Augmentations:
    """The run's augmentation settings and seed."""

    flip: bool = False
    color_jitter: float = 0.0
    random_crop: bool = False
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.flip or self.color_jitter > 0 or self.random_crop

    def variant(self, image_key: str, number: int) -> Variant:
        """Variant `number` (0 to VARIANTS - 1) of the image `image_key` names (its content hash):
        half of them mirrored when flip is on."""
        if not self.active:
            return PLAIN
        draw = random.Random(f"{self.seed}|{image_key}|{number}")
        jitter = self.color_jitter

        def factor() -> float:
            return round(1.0 + draw.uniform(-jitter, jitter), 4) if jitter else 1.0

        brightness, contrast, saturation = factor(), factor(), factor()
        if self.random_crop:
            zoom, crop_x, crop_y = (round(draw.uniform(1.0, MAX_ZOOM), 4), round(draw.random(), 4),
                                    round(draw.random(), 4))
        else:
            zoom, crop_x, crop_y = 1.0, 0.5, 0.5
        return Variant(self.flip and number % 2 == 1, brightness, contrast, saturation, zoom, crop_x, crop_y)

    def pick(self, batch_number: int, position: int) -> int:
        """Which variant the image at `position` of micro-batch `batch_number` is (seeded)."""
        if not self.active:
            return 0
        return random.Random(f"{self.seed}|augment|{batch_number}|{position}").randrange(VARIANTS)
