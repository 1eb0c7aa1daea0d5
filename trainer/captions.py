"""Caption rules from the guide: a unique trigger word in every caption, exactly once and first;
missing captions filled from a template; and the caption style each family expects (tags for
SD 1.5, mixed for SDXL, natural sentences for FLUX), changed only where that is lossless.

An automatic captioner plugs in as `Captioner`: any callable from an image to a caption.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from .data import Dataset, ImageItem
from .families import get_family

Captioner = Callable[[Image.Image], str]


def _strip_trigger(caption: str, trigger: str) -> str:
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)
    text = pattern.sub("", caption)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # collapse the commas left behind
    return re.sub(r"\s+", " ", text).strip(" ,;")


def to_style(caption: str, style: str) -> str:
    """Tidy a caption into a family's style without inventing or dropping words."""
    text = re.sub(r"\s+", " ", caption).strip()
    if style == "tags":
        tags = [t.strip() for t in re.split(r"[,;]", text.rstrip(".")) if t.strip()]
        return ", ".join(dict.fromkeys(tags))
    if style == "natural" and text and text[-1] not in ".!?":
        return text + "."
    return text


def with_trigger(caption: str, trigger: str, style: str) -> str:
    """The caption with `trigger` exactly once, first."""
    rest = to_style(_strip_trigger(caption, trigger), style) if trigger else to_style(caption, style)
    if not trigger:
        return rest
    if not rest:
        return trigger
    return f"{trigger}, {rest}" if style == "tags" else f"{trigger} {rest}"


def fill_template(template: str, trigger: str, item: ImageItem) -> str:
    return template.format(trigger=trigger, name=item.path.stem, folder=item.folder).strip()


def recaption(dataset: Dataset, trigger: str, family: str, template: str,
              captioner: Captioner | None = None) -> Dataset:
    """A new dataset whose captions follow the rules; the input dataset is not changed."""
    style = get_family(family).caption_style
    items = []
    for item in dataset.items:
        caption = item.caption if item.captioned else ""
        if not caption and captioner is not None:
            caption = captioner(item.image) if item.image is not None else captioner(Image.open(item.path))
        caption = caption or fill_template(template, trigger, item)
        items.append(replace(item, caption=with_trigger(caption, trigger, style), captioned=True))
    return Dataset(items=items, warnings=list(dataset.warnings), trigger_words=[trigger] if trigger else [])
