"""Training examples: each dataset image bucketed, its latents and caption conditioning computed
once with the model's own VAE and text encoder (in memory, and optionally in an on-disk cache
keyed by file content and settings), and batches assembled from them.

With caching off, when the text encoder is trained, or when tags are shuffled, the caption work is
done again for every batch. Caption dropout keeps the cache: a dropped caption uses the empty
caption's conditioning, encoded once. With augmentations (trainer/augment.py) each image's variant
is encoded the first time it is drawn and reused after (in memory, and on disk under its own key);
`variant_hits` and `variant_misses` count the draws that found their variant encoded or not.
With masked loss each encoding carries its mask's loss weights at the latent grid.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .augment import PLAIN, Augmentations, Variant
from .captions import CaptionVariation
from .data import Dataset, ImageItem, MaskSettings, bucket_sizes, choose_bucket, prepare_image
from .families.base import LoadedModel
from .files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One variant of an example as training reads it: its latents (cached) or pixels (encoded at each
    use), its loss weights (masked loss: at the latent grid when cached, else at pixel size), and
    the image conditioning of its crop (SDXL's sizes)."""

    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    image_conditioning: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Example:
    """One image at one training size (each image is an example at each size of a multi-resolution
    run) and its encodings: the plain image's, and with augmentations each variant's once drawn."""

    item: ImageItem
    bucket: tuple[int, int]
    repeats: int
    caption: str
    size: int  # the training size (resolution) it was bucketed at
    variants: dict[str, Encoded] = field(default_factory=dict)  # Variant.key() -> its encoding
    conditioning: dict[str, torch.Tensor] | None = None  # cached text conditioning

    @property
    def latents(self) -> torch.Tensor | None:
        return self.variants[PLAIN.key()].latents if PLAIN.key() in self.variants else None

    @property
    def image_conditioning(self) -> dict[str, torch.Tensor]:
        return self.variants[PLAIN.key()].image_conditioning if PLAIN.key() in self.variants else {}


class DiskCache:
    """Tensors stored as .safetensors files named by a hash of everything that produced them."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser() if folder else None
        self.hits = self.misses = 0

    def get_or_compute(self, key_parts: tuple, compute) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return compute()
        key = hashlib.sha256("\x1f".join(map(str, key_parts)).encode()).hexdigest()
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            try:
                value = load_file(str(path))
                self.hits += 1
                return value
            except Exception:  # a damaged cache entry is recomputed, never fatal
                log.warning("Cache entry %s was unreadable; recomputing it.", path.name)
        self.misses += 1
        value = compute()
        atomic_write(path, lambda temporary: save_file({k: v.contiguous() for k, v in value.items()}, temporary))
        return value


class TrainingSet:
    def __init__(self, model: LoadedModel, dataset: Dataset, resolution: int | tuple[int, ...], bucketing: bool,
                 cache: bool, cache_dir: str, text_trained: bool, variation: CaptionVariation | None = None,
                 augment: Augmentations | None = None, masking: MaskSettings | None = None) -> None:
        self.model = model
        self.variation = variation or CaptionVariation()
        self.augment = augment or Augmentations()
        self.masking = masking
        self.cache_latents = cache
        self.cache_text = cache and not text_trained and not self.variation.shuffle
        self.disk = DiskCache(cache_dir)
        self.identity = f"{model.family.name}|{model.identity.key}"  # cached encodings never outlive their model
        self.variant_hits = self.variant_misses = 0
        self._content: dict[int, str] = {}  # id(item) -> its content hash, read once
        multiple = model.family.pixel_multiple(model)
        self.sizes = tuple(sorted(set(resolution))) if isinstance(resolution, tuple) else (resolution,)
        self.examples: list[Example] = []
        for size in self.sizes:
            square = (size // multiple * multiple,) * 2
            buckets = bucket_sizes(size, multiple) if bucketing else [square]
            for item in dataset.items:
                bucket = choose_bucket(item.size, buckets) if bucketing else square
                example = Example(item, bucket, item.repeats, item.caption, size)
                if not self.augment.active:
                    example.variants[PLAIN.key()] = self._encode_variant(example, PLAIN)
                if self.cache_text:
                    example.conditioning = self.disk.get_or_compute(
                        ("text", self.identity, item.caption), lambda c=item.caption: self._encode_text([c], row=0))
                self.examples.append(example)
        self.empty_conditioning = (self.disk.get_or_compute(("text", self.identity, ""),
                                                            lambda: self._encode_text([""], 0))
                                   if self.cache_text and self.variation.dropout else None)
        if self.disk.folder is not None:
            log.info("Encoding cache: %d reused, %d computed.", self.disk.hits, self.disk.misses)

    @property
    def encodes_in_loop(self) -> bool:
        """Whether the VAE still encodes images while training (no latent cache, or variants drawn
        for the first time)."""
        return not self.cache_latents or self.augment.active

    def _content_hash(self, item: ImageItem) -> str:
        if id(item) not in self._content:
            self._content[id(item)] = item.content_hash()
        return self._content[id(item)]

    def _encode_variant(self, example: Example, variant: Variant) -> Encoded:
        """A variant of an example, prepared (and with the latent cache, encoded) now: in memory, and
        on disk under a key of everything that made it (image, mask, bucket, variant, mask setting)."""
        item = example.item
        prepared = prepare_image(item, example.bucket, variant, self.masking)
        bucket = example.bucket
        conditioning = self.model.family.image_conditioning(prepared.original_size, prepared.crop_top_left,
                                                            (bucket[1], bucket[0]))
        if not self.cache_latents:
            return Encoded(pixels=prepared.pixels, mask=prepared.mask, image_conditioning=conditioning)
        key = ["latents", self.identity, self._content_hash(item), bucket]
        if variant.key():
            key.append(variant.key())
        if prepared.mask is not None:
            key += ["mask", item.mask_hash(), self.masking.min_weight]

        def encode() -> dict[str, torch.Tensor]:
            latents = self._encode_images(prepared.pixels[None])[0]
            value = {"latents": latents}
            if prepared.mask is not None:
                value["mask"] = latent_grid(prepared.mask, latents)
            return value

        value = self.disk.get_or_compute(tuple(key), encode)
        return Encoded(latents=value["latents"], mask=value.get("mask"), image_conditioning=conditioning)

    def encoded(self, index: int, batch_number: int | None, position: int) -> Encoded:
        """The encoding an example trains with in micro-batch `batch_number` at `position`: its variant
        as the seeded draw picks it (encoded now if it is the first time), or the plain image."""
        example = self.examples[index]
        variant = (self.augment.variant(self._content_hash(example.item),
                                        self.augment.pick(batch_number, position))
                   if batch_number is not None and self.augment.active else PLAIN)
        drawn = self.augment.active and batch_number is not None
        if variant.key() in example.variants:
            self.variant_hits += drawn
            return example.variants[variant.key()]
        on_disk = self.disk.hits
        example.variants[variant.key()] = self._encode_variant(example, variant)
        found = self.disk.hits > on_disk  # encoded by an earlier run (or segment) and read back
        self.variant_hits += drawn and found
        self.variant_misses += drawn and not found
        return example.variants[variant.key()]

    def encode_prompts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts (e.g. the sample prompts) encoded as the captions are: through the disk cache
        where text is cached, so a resumed run does not encode them again."""
        if not self.cache_text:
            with torch.no_grad():
                return {key: value.float().cpu() for key, value in self.model.encoders.encode_prompts(texts).items()}
        rows = [self.disk.get_or_compute(("text", self.identity, text), lambda t=text: self._encode_text([t], row=0))
                for text in texts]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encoders.encode_images(pixels).float().cpu()

    @torch.no_grad()
    def _encode_text(self, captions: list[str], row: int) -> dict[str, torch.Tensor]:
        encoded = self.model.encoders.encode_prompts(captions)
        return {key: value[row].float().cpu() for key, value in encoded.items()}

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [example.bucket for example in self.examples]

    @property
    def repeats(self) -> list[int]:
        return [example.repeats for example in self.examples]

    def step_mix(self, batch_size: int) -> dict[int, float]:
        """Each training size's share of an epoch's batches (a multi-resolution run's step mix)."""
        images: Counter = Counter()
        for example in self.examples:
            images[example.size, example.bucket] += example.repeats
        batches: Counter = Counter()
        for (size, _), count in images.items():
            batches[size] += -(-count // batch_size)
        return {size: batches[size] / sum(batches.values()) for size in self.sizes}

    def batch(self, indices: list[int], dtype: torch.dtype,
              batch_number: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents and conditioning for a batch, on the model's device (see `weighted_batch`)."""
        latents, conditioning, _ = self.weighted_batch(indices, dtype, batch_number)
        return latents, conditioning

    def weighted_batch(self, indices: list[int], dtype: torch.dtype, batch_number: int | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Latents, conditioning and (with masked loss, where an image has a mask) the loss weights at
        the latent grid for a batch, on the model's device. With a `batch_number` (the training
        loop's), captions vary and images are augmented as the settings say; without, they are as
        written and as they are."""
        device = self.model.device
        examples = [self.examples[i] for i in indices]
        encodings = [self.encoded(i, batch_number, position) for position, i in enumerate(indices)]
        if self.cache_latents:
            latents = torch.stack([e.latents for e in encodings])
        else:
            latents = self._encode_images(torch.stack([e.pixels for e in encodings]))
        weights = self._loss_weights(encodings, latents)
        captions = [e.caption if batch_number is None else self.variation.apply(e.caption, batch_number, position)
                    for position, e in enumerate(examples)]
        if self.cache_text:
            rows = [e.conditioning if caption or not e.caption else self.empty_conditioning
                    for e, caption in zip(examples, captions, strict=True)]
            conditioning = {key: torch.stack([row[key] for row in rows]).to(device, dtype) for key in rows[0]}
        else:
            # Text-encoder LoRA needs gradients through the encoder, so this is not under no_grad.
            conditioning = self.model.encoders.encode_prompts(captions)
            conditioning = {key: value.to(dtype) for key, value in conditioning.items()}
        for key in encodings[0].image_conditioning:
            conditioning[key] = torch.stack([e.image_conditioning[key] for e in encodings]).to(device, dtype)
        return latents.to(device, dtype), conditioning, None if weights is None else weights.to(device)

    def _loss_weights(self, encodings: list[Encoded], latents: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, h, w) weights: min_weight + (1 - min_weight) x mask, 1 for an image without a mask;
        None when no image of the batch has one."""
        if self.masking is None or all(e.mask is None for e in encodings):
            return None
        floor = self.masking.min_weight
        grids = [torch.ones((1, *latents.shape[-2:])) if e.mask is None else
                 floor + (1 - floor) * latent_grid(e.mask, latents) for e in encodings]
        return torch.stack(grids)


def latent_grid(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A (1, H, W) mask averaged down to the latents' grid (each latent's share of counted pixels)."""
    if tuple(mask.shape[-2:]) == tuple(latents.shape[-2:]):
        return mask
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(latents.shape[-2:]), mode="area")[0]
