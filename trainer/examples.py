"""Training examples: each dataset image bucketed, its latents and caption conditioning computed
once with the model's own VAE and text encoder (in memory, and optionally in an on-disk cache
keyed by file content and settings), and batches assembled from them.

With caching off, when the text encoder is trained, or when tags are shuffled, the caption work is
done again for every batch. Caption dropout keeps the cache: a dropped caption uses the empty
caption's conditioning, encoded once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .captions import CaptionVariation
from .data import Dataset, bucket_sizes, choose_bucket, prepare_image
from .families.base import LoadedModel
from .files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Example:
    bucket: tuple[int, int]
    repeats: int
    caption: str
    latents: torch.Tensor | None = None  # cached
    pixels: torch.Tensor | None = None  # when latents are not cached
    conditioning: dict[str, torch.Tensor] | None = None  # cached text conditioning
    image_conditioning: dict[str, torch.Tensor] = field(default_factory=dict)


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
    def __init__(self, model: LoadedModel, dataset: Dataset, resolution: int, bucketing: bool, cache: bool,
                 cache_dir: str, text_trained: bool, variation: CaptionVariation | None = None) -> None:
        self.model = model
        self.variation = variation or CaptionVariation()
        self.cache_latents = cache
        self.cache_text = cache and not text_trained and not self.variation.shuffle
        multiple = model.family.pixel_multiple(model)
        square = (resolution // multiple * multiple,) * 2
        buckets = bucket_sizes(resolution, multiple) if bucketing else [square]
        self.disk = DiskCache(cache_dir)
        identity = f"{model.family.name}|{model.identity.key}"  # cached encodings never outlive their model
        self.identity = identity
        self.examples: list[Example] = []
        for item in dataset.items:
            bucket = choose_bucket(item.size, buckets) if bucketing else square
            prepared = prepare_image(item, bucket)
            example = Example(bucket, item.repeats, item.caption,
                              image_conditioning=model.family.image_conditioning(
                                  prepared.original_size, prepared.crop_top_left, (bucket[1], bucket[0])))
            if self.cache_latents:
                example.latents = self.disk.get_or_compute(
                    ("latents", identity, item.content_hash(), bucket),
                    lambda p=prepared: {"latents": self._encode_images(p.pixels[None])[0]})["latents"]
            else:
                example.pixels = prepared.pixels
            if self.cache_text:
                example.conditioning = self.disk.get_or_compute(
                    ("text", identity, item.caption), lambda c=item.caption: self._encode_text([c], row=0))
            self.examples.append(example)
        self.empty_conditioning = (self.disk.get_or_compute(("text", identity, ""), lambda: self._encode_text([""], 0))
                                   if self.cache_text and self.variation.dropout else None)
        if self.disk.folder is not None:
            log.info("Encoding cache: %d reused, %d computed.", self.disk.hits, self.disk.misses)

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

    def batch(self, indices: list[int], dtype: torch.dtype,
              batch_number: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents and conditioning for a batch, on the model's device. With a `batch_number` (the
        training loop's), captions vary as the caption settings say; without, they are as written."""
        device = self.model.device
        examples = [self.examples[i] for i in indices]
        if self.cache_latents:
            latents = torch.stack([e.latents for e in examples])
        else:
            latents = self._encode_images(torch.stack([e.pixels for e in examples]))
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
        for key in examples[0].image_conditioning:
            conditioning[key] = torch.stack([e.image_conditioning[key] for e in examples]).to(device, dtype)
        return latents.to(device, dtype), conditioning
