"""The registry of model families, and detection of a model's family from a folder or a file.

Everything LoRA Lab knows about one kind of base model lives in its family class (see base.py);
the rest of the project asks the registry. Families are imported on first use, so reading the
names (settings, `--help`) never loads diffusers.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraLabError

if TYPE_CHECKING:
    from .base import ModelFamily

# name -> "module:class". Adding a family means a module in this folder and a line here.
REGISTRY = {"sd15": "sd15:StableDiffusionFamily", "sdxl": "sdxl:StableDiffusionXLFamily", "flux": "flux:FluxFamily",
            "zimage": "zimage:ZImageFamily", "flux2": "flux2:Flux2KleinFamily"}
FAMILY_NAMES = tuple(REGISTRY)
# Where no model says otherwise (a dataset checked or captioned without one): the most trained family.
DEFAULT_FAMILY = FAMILY_NAMES[0]
# CLIP's vocabulary (CLIP-L's, which every family's first text encoder shares), shipped offline.
CLIP_TOKENIZER = Path(__file__).parent / "configs" / DEFAULT_FAMILY / "tokenizer"


@cache
def get_family(name: str) -> ModelFamily:
    if name not in REGISTRY:
        raise LoraLabError(f"Model family {name!r} is not available; choose one of: {', '.join(REGISTRY)}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)()


def all_families() -> list[ModelFamily]:
    return [get_family(name) for name in REGISTRY]


def detect_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """The family of an original-format checkpoint from its tensor names and shapes."""
    for family in all_families():
        if family.recognises(shapes):
            return family.name
    sample = ", ".join(list(shapes)[:3]) or "no tensors at all"
    raise LoraLabError(f"Could not recognise this checkpoint as one of {', '.join(f.title for f in all_families())} "
                       f"(first tensors: {sample}). Use a full original-format checkpoint of one of those, or a "
                       "diffusers folder.")


def detect_source_family(source: Path) -> str:
    """The family of a diffusers folder (from its pipeline class) or a checkpoint file."""
    from .base import read_model_index, read_safetensors_header

    if source.is_dir():
        pipeline = read_model_index(source).get("_class_name")
        for family in all_families():
            if pipeline in family.pipeline_classes:
                return family.name
        known = sorted(name for family in all_families() for name in family.pipeline_classes)
        raise LoraLabError(f"{source} holds a {pipeline} model; LoRA Lab trains "
                           f"{', '.join(f.title for f in all_families())} ({', '.join(known)}).")
    if not source.is_file():
        raise LoraLabError(f"Base model {source} does not exist; give a diffusers folder or a .safetensors "
                           "checkpoint file.")
    return detect_family(read_safetensors_header(source))


__all__ = ["FAMILY_NAMES", "REGISTRY", "all_families", "detect_family", "detect_source_family", "get_family"]
