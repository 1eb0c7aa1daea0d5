"""Datasets: find images and captions in a folder, read them safely, bucket them by aspect ratio,
and lay out the order batches are drawn in.

A folder holds images (`.jpg .jpeg .png .webp`) with same-name `.txt` captions, directly or in
kohya-style `N_name` subfolders whose images count N times per epoch. Broken files are skipped
with a warning that names them; only a dataset with nothing usable left is an error.

An image's mask (for masked loss) is a `name_mask.png` beside it, a same-name image in a `masks/`
folder beside it, or else its own alpha channel: white or opaque counts, black or transparent
does not.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .augment import PLAIN, Variant
from .errors import LoraLabError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MASK_SUFFIX, MASK_FOLDER = "_mask", "masks"
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are refused: far above any training resolution


@dataclass(frozen=True)
class ImageItem:
    """One training image: where it is, its caption, and how often it counts per epoch."""

    path: Path
    caption: str
    repeats: int = 1
    folder: str = ""
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation
    captioned: bool = True  # False when the caption came from the folder name, not a .txt file
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # for in-memory datasets
    mask_path: Path | None = None  # its mask file (name_mask.png or masks/name.png)
    mask_image: Image.Image | None = field(default=None, compare=False, repr=False)  # an in-memory mask (MASK)
    alpha: bool = False  # its alpha channel is its mask (transparent somewhere, no mask file)

    def content_hash(self) -> str:
        if self.image is not None:
            return hashlib.sha256(self.image.tobytes()).hexdigest()
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def mask_source(self) -> str:
        """Where its mask comes from: "file", "graph", "alpha", or "" (none)."""
        return ("graph" if self.mask_image is not None else "file" if self.mask_path is not None else
                "alpha" if self.alpha else "")

    def mask_hash(self) -> str:
        """A digest of its mask ("" when it has none; an alpha mask is part of the image's own hash)."""
        if self.mask_image is not None:
            return hashlib.sha256(self.mask_image.tobytes()).hexdigest()
        if self.mask_path is not None:
            return hashlib.sha256(self.mask_path.read_bytes()).hexdigest()
        return "alpha" if self.alpha else ""


@dataclass
class Dataset:
    items: list[ImageItem]
    warnings: list[str] = field(default_factory=list)
    trigger_words: list[str] = field(default_factory=list)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Comma-separated tag counts per folder, as kohya's ss_tag_frequency records them."""
        result: dict[str, Counter] = {}
        for item in self.items:
            tags = [tag.strip() for tag in item.caption.split(",") if tag.strip()]
            result.setdefault(item.folder or ".", Counter()).update(tags)
        return {folder: dict(counts) for folder, counts in result.items()}


def has_transparency(path: Path) -> bool:
    """Whether an image has an alpha channel that is transparent somewhere (then it is a mask)."""
    with Image.open(path) as opened:
        if not (opened.mode in ("RGBA", "LA", "PA") or (opened.mode == "P" and "transparency" in opened.info)):
            return False
        opened.seek(0)
        return ImageOps.exif_transpose(opened).convert("RGBA").getchannel("A").getextrema()[0] < 255


def load_mask(item: ImageItem, size: tuple[int, int] | None = None) -> Image.Image | None:
    """An item's mask as a grayscale image (255 = counts), upright as its image is, at `size`
    (its image's size by default: a mask of another size is stretched to it; the doctor flags it)."""
    mask = read_mask(item)
    size = size or item.size
    return mask if mask is None or mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def read_mask(item: ImageItem) -> Image.Image | None:
    """An item's mask at its own size (None when it has none)."""
    if item.mask_image is not None:
        mask = item.mask_image.convert("L")
    elif item.mask_path is not None:
        with Image.open(item.mask_path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
    elif item.alpha:
        with Image.open(item.path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("RGBA").getchannel("A")
    else:
        return None
    return mask


def find_mask(image: Path) -> Path | None:
    """The mask file of a dataset image: `name_mask.png` beside it, or `masks/name.*`."""
    candidates = [image.with_name(image.stem + MASK_SUFFIX + ext) for ext in IMAGE_EXTENSIONS]
    candidates += [image.parent / MASK_FOLDER / (image.stem + ext) for ext in IMAGE_EXTENSIONS]
    return next((path for path in candidates if path.is_file()), None)


def load_image(path: Path) -> Image.Image:
    """An RGB image, upright per its EXIF orientation; alpha is composited on white, 16-bit and
    grayscale images are scaled to 8-bit RGB, an animation gives its first frame."""
    with Image.open(path) as opened:
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise LoraLabError(f"{path.name} is {width}x{height} pixels, too large to be a training image; "
                               "downscale it (e.g. to 2048 px on the long side).")
        opened.seek(0)
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


MAX_CAPTION_BYTES = 64 * 1024  # a caption is a line or a paragraph; far more is not a caption file


def read_caption(path: Path, warnings: list[str]) -> str | None:
    """A caption file's text, or None (with a warning naming it) when it cannot be a caption.
    UTF-8 (with or without BOM) and UTF-16 are read as is; other text is read as Windows-1252
    with a warning, since that is what older editors write."""
    if path.stat().st_size > MAX_CAPTION_BYTES:
        warnings.append(f"Skipped {path.with_suffix('').name}: its caption {path.name} is over "
                        f"{MAX_CAPTION_BYTES // 1024} KB, which is not a caption; shorten it.")
        return None
    raw = path.read_bytes()
    text = None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    elif b"\x00" in raw and len(raw) % 2 == 0:  # UTF-16 without a BOM: every other byte is zero
        text = raw.decode("utf-16-le" if raw[1::2].count(0) > raw[0::2].count(0) else "utf-16-be", errors="replace")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = raw.decode("cp1252")
                warnings.append(f"Caption {path.name} is not UTF-8; read it as Windows-1252. Re-save it as UTF-8 if "
                                "accented letters look wrong.")
            except UnicodeDecodeError:
                warnings.append(f"Skipped {path.with_suffix('').name}: its caption {path.name} is not text "
                                "(not UTF-8, UTF-16 or Windows-1252); open it in a text editor and save it as UTF-8.")
                return None
    # Control characters (a stray NUL, escape codes) mean nothing to a text encoder.
    cleaned = "".join(c if c.isprintable() or c in "\n\t" else " " for c in text)
    return cleaned.strip()


def scan_folder(folder: str | Path) -> Dataset:
    """Every usable image in a dataset folder with its caption and repeat count."""
    root = Path(folder).expanduser()
    if not str(folder).strip():
        raise LoraLabError("No dataset folder given; set it to a folder of images with .txt captions.")
    if not root.is_dir():
        raise LoraLabError(f"Dataset folder {root} does not exist; check the path (it must be a folder of "
                           "images with same-name .txt captions).")
    dataset = Dataset(items=[])
    folders: list[tuple[Path, int, str]] = [(root, 1, "")]
    # A link to a file or folder elsewhere is never followed: a shared workflow names only the
    # dataset folder, and nothing outside it is read.
    inside = root.resolve()

    def outside(path: Path, what: str) -> bool:
        if path.resolve().is_relative_to(inside):
            return False
        dataset.warnings.append(f"Skipped {what} {path.name}: it is a link to something outside the dataset folder; "
                                "copy the file itself into the folder.")
        return True

    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if outside(sub, "subfolder"):
            continue
        match = REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) > 0:
            folders.append((sub, int(match.group(1)), match.group(2)))
        elif not sub.name.startswith(".") and sub.name != MASK_FOLDER:
            dataset.warnings.append(f"Skipped subfolder {sub.name}: only 'N_name' subfolders (e.g. 10_my_style) "
                                    "are read, N being how often each image repeats per epoch.")
    for path_folder, repeats, name in folders:
        for path in sorted(path_folder.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file() or outside(path, "image"):
                continue
            owner = path.stem.removesuffix(MASK_SUFFIX)
            if owner != path.stem and any(path.with_name(owner + ext).is_file() for ext in IMAGE_EXTENSIONS):
                continue  # another image's mask
            try:
                with Image.open(path) as probe:
                    probe.verify()
                size = load_image(path).size
                alpha = has_transparency(path)
            except LoraLabError as error:
                dataset.warnings.append(f"Skipped {path.name}: {error}")
                continue
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
                dataset.warnings.append(f"Skipped {path.name}: not a readable image ({error}). Replace or remove it.")
                continue
            caption_path = path.with_suffix(".txt")
            captioned = caption_path.is_file()
            if captioned and outside(caption_path, "caption of"):
                continue
            if captioned:
                caption = read_caption(caption_path, dataset.warnings)
                if caption is None:
                    continue
            else:
                caption = name
                dataset.warnings.append(f"{path.name} has no caption file {caption_path.name}; "
                                        f"using {'the folder name ' + repr(name) if name else 'an empty caption'}.")
            mask = find_mask(path)
            if mask is not None and outside(mask, "mask"):
                mask = None
            dataset.items.append(ImageItem(path, caption, repeats, path_folder.name if name else "", size, captioned,
                                           mask_path=mask, alpha=alpha and mask is None))
    if not dataset.items:
        problems = "; ".join(dataset.warnings[:5])
        raise LoraLabError(f"No usable images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files"
                           f"{', directly and in N_name subfolders' if len(folders) > 1 else ''})."
                           + (f" Problems: {problems}" if problems else " Add images with .txt captions."))
    dataset.trigger_words = sorted({name for _, _, name in folders[1:] if name})
    for warning in dataset.warnings:
        log.warning(warning)
    return dataset


VALIDATION_SHARE = 0.1  # of the images, held out to measure what the LoRA does on images it never saw
MIN_TRAINING_IMAGES = 10  # the guide's minimum for any LoRA type: never held out below this


def validation_count(image_count: int, setting: int) -> int:
    """How many images to hold out: `setting` when given (>0), none for -1, else (0, auto) 10 % of
    the images, 2 to 10, and only while at least 10 remain to train on."""
    if setting < 0:
        return 0
    if setting > 0:
        if image_count - setting < 1:
            raise LoraLabError(f"validation_images = {setting} leaves no image to train on ({image_count} images); "
                               "hold out fewer, or set -1 to train without validation.")
        return setting
    share = min(10, max(2, round(VALIDATION_SHARE * image_count)))
    return share if image_count - share >= MIN_TRAINING_IMAGES else 0


def split_validation(dataset: Dataset, count: int) -> tuple[Dataset, Dataset]:
    """(training, validation): `count` images spread evenly over the dataset (so every repeat
    folder and kind of image is measured), the same ones every time for the same dataset."""
    if count <= 0:
        return dataset, Dataset(items=[])
    ordered = sorted(range(len(dataset.items)), key=lambda i: (dataset.items[i].folder, dataset.items[i].path.name))
    chosen = {ordered[int((k + 0.5) * len(ordered) / count)] for k in range(count)}
    train = [item for i, item in enumerate(dataset.items) if i not in chosen]
    held_out = [item for i, item in enumerate(dataset.items) if i in chosen]
    return (Dataset(train, dataset.warnings, dataset.trigger_words),
            Dataset(held_out, [], dataset.trigger_words))


def dataset_from_images(images: list[Image.Image], captions: list[str],
                        masks: list[Image.Image] | None = None) -> Dataset:
    """A dataset from images already in memory (e.g. an IMAGE batch in a ComfyUI graph), with a mask
    for each (or one mask for all) when given."""
    if not images:
        raise LoraLabError("The image batch is empty; connect at least one image.")
    if captions and len(captions) != len(images):
        raise LoraLabError(f"{len(images)} images but {len(captions)} captions; give one caption per image.")
    masks = masks or []
    if len(masks) == 1:
        masks = masks * len(images)
    if masks and len(masks) != len(images):
        raise LoraLabError(f"{len(images)} images but {len(masks)} masks; connect one mask per image, or one for all.")
    captions = captions or [""] * len(images)
    items = [ImageItem(Path(f"image_{i:04d}.png"), c.strip(), 1, "", im.size, bool(c.strip()), im.convert("RGB"),
                       mask_image=masks[i].convert("L") if masks else None)
             for i, (im, c) in enumerate(zip(images, captions, strict=True))]
    return Dataset(items=items)


# --- aspect-ratio buckets --------------------------------------------------------------------

def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `multiple`, with about resolution² pixels each."""
    area = resolution * resolution
    sizes = set()
    for width in range(multiple, int(resolution * max_ratio) + 1, multiple):
        height = int(area / width) // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are alike)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width), as SDXL's size conditioning wants it
    crop_top_left: tuple[int, int]
    mask: torch.Tensor | None = None  # (1, H, W) loss weights in [0, 1], with masked loss


@dataclass(frozen=True)
class MaskSettings:
    """Masked loss: the weight outside the mask; at 0 the pixels there are replaced by grey before
    anything reads them, so nothing outside the mask can reach the model (not even through the
    resize or the VAE's view of its neighbours)."""

    min_weight: float = 0.0


def prepare_image(item: ImageItem, bucket: tuple[int, int], variant: Variant = PLAIN,
                  masking: MaskSettings | None = None) -> PreparedImage:
    """Resize so the image covers the bucket (times the variant's zoom), crop to it (centred, or where
    the variant says), mirror and recolour as the variant says, scale to [-1, 1]; with `masking`,
    the image's mask goes through the same resize, crop and mirror."""
    image = item.image if item.image is not None else load_image(item.path)
    mask = load_mask(item, image.size) if masking is not None else None
    if mask is not None and masking.min_weight == 0:
        image = Image.composite(image, Image.new("RGB", image.size, (128, 128, 128)),
                                mask.point(lambda value: 255 if value else 0))
    width, height = bucket
    scale = max(width / image.width, height / image.height) * variant.zoom
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = round((size[0] - width) * variant.crop_x), round((size[1] - height) * variant.crop_y)
    box = (left, top, left + width, top + height)
    cropped = variant.colour(variant.mirror(resized.crop(box)))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    weights = None
    if mask is not None:
        shaped = variant.mirror(mask.resize(size, Image.Resampling.BILINEAR).crop(box))
        weights = torch.from_numpy(np.asarray(shaped, dtype=np.float32) / 255.0)[None]
    return PreparedImage(pixels.contiguous(), (image.height, image.width), (top, left), weights)


# --- batch order -----------------------------------------------------------------------------

def epoch_batches(bucket_of: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The batches of one epoch as lists of example indices. Each batch holds one bucket only.

    The order depends only on (seed, epoch), so a resumed run can recompute exactly where it was.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, (bucket, count) in enumerate(zip(bucket_of, repeats, strict=True)):
        by_bucket.setdefault(bucket, []).extend([index] * count)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchOrder:
    """An endless stream of batches, epoch after epoch, that can start at any batch number."""

    def __init__(self, bucket_of: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int):
        self._args = (bucket_of, repeats, batch_size, seed)
        self._epoch, self._batches = 0, epoch_batches(bucket_of, repeats, batch_size, seed, 0)
        self.batches_per_epoch = len(self._batches)

    def batch(self, number: int) -> list[int]:
        epoch, position = divmod(number, self.batches_per_epoch)
        bucket_of, repeats, batch_size, seed = self._args
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(bucket_of, repeats, batch_size, seed, epoch)
        return self._batches[position]
