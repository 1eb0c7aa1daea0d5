"""Automatic captions, offline: a captioning model read from a folder on this machine (never
downloaded), loaded when first used and freed after.

Supported: BLIP image captioning (`BlipForConditionalGeneration` through transformers, e.g. a
copy of Salesforce/blip-image-captioning-base or -large: the folder with its config.json, weights
and processor files). BLIP writes short descriptions ("a woman with red hair sitting on a bench");
the Caption node then puts the trigger word first and converts to the family's caption style.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from .captions import Captioner
from .errors import LoraLabError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("BlipForConditionalGeneration",)
HOW_TO_GET_ONE = ("a BLIP captioning model folder (for example Salesforce/blip-image-captioning-base, with its "
                  "config.json, weights and processor files)")
MAX_WORDS = 40


def architecture(folder: Path) -> str | None:
    """The model class a folder's config.json names, or None when it is not a model folder."""
    try:
        names = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return None
    return names[0] if names else None


def find_captioners(root: Path) -> list[str]:
    """The subfolders of `root` that hold a supported captioning model, by name."""
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir()
                  if path.is_dir() and architecture(path) in SUPPORTED_ARCHITECTURES)


@contextmanager
def loaded_captioner(folder: Path, device: torch.device) -> Iterator[Captioner]:
    """A captioner for the model in `folder`, loaded now and freed when the block ends."""
    found = architecture(folder) if folder.is_dir() else None
    if found not in SUPPORTED_ARCHITECTURES:
        what = "is missing" if not folder.is_dir() else (
            "has no config.json" if found is None else f"holds a {found}, which LoRA Lab cannot caption with")
        raise LoraLabError(f"The captioning model folder {folder} {what}. Put {HOW_TO_GET_ONE} there, or choose "
                           "captioner 'none' to use the template.")
    from transformers import BlipForConditionalGeneration, BlipProcessor

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as error:
        raise LoraLabError(f"The captioning model in {folder} could not be read ({error}). It needs "
                           f"{HOW_TO_GET_ONE}.") from None
    model.to(device).eval()
    log.info("Captioning with %s on %s", folder.name, device)

    @torch.no_grad()
    def caption(image: Image.Image) -> str:
        inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(device, dtype)
        tokens = model.generate(**inputs, max_new_tokens=MAX_WORDS * 2, num_beams=3)
        words = processor.decode(tokens[0], skip_special_tokens=True).split()
        return " ".join(words[:MAX_WORDS])

    try:
        yield caption
    finally:
        model = None  # the closure's reference too: the weights go now, not when the caller drops `caption`
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
