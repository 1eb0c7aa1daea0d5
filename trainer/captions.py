"""Caption rules from the guide: a unique trigger word in every caption; missing captions filled
from a template or an automatic captioner; the caption style each family expects (the guide's
"Quick Caption Guide"); and the variation training applies (dropout, tag shuffle, keep-tokens):

- SD 1.5, tags: `xyz_style, digital art, landscape, mountains, sunset, vibrant colors` - the
  trigger is the first tag (kohya's keep-tokens keeps it there when tags are shuffled);
- SDXL, mixed: `xyz_style digital painting of mountains at sunset, vibrant colors, detailed`;
- FLUX, natural sentences: `A beautiful mountain landscape at sunset in the xyz_style, with
  vibrant orange and purple colors` - a sentence keeps its trigger where it stands.

Converting between the styles never invents a word and drops only what a tag list does not need
(articles, joining words, repeats): a sentence, or a long phrase between commas, becomes tags by
cutting it at the small words that join phrases (with, and, at, in, on, of); a tag list becomes a
sentence by listing its comma parts, whole, after the trigger.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image

from .data import Dataset, ImageItem, load_image
from .families import get_family

Captioner = Callable[[Image.Image], str]
JOINERS = re.compile(r"\s*(?:[,;.]|\bwith\b|\band\b|\bat\b|\bin\b|\bon\b|\bof\b)\s*", re.IGNORECASE)
ARTICLES = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def trigger_pattern(trigger: str) -> re.Pattern:
    """The trigger as a whole word (not inside another word or a longer tag name)."""
    return re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)


LONG_TAG_WORDS = 5  # a comma part this long is a phrase, cut again at its joining words


def tags_of(caption: str) -> list[str]:
    """A caption as tags: split at commas and semicolons, or, for a sentence, at joining words;
    a long phrase between commas is cut at its joining words too."""
    text = re.sub(r"\s+", " ", caption).strip().rstrip(".")
    parts = JOINERS.split(text) if is_sentence(text) else re.split(r"[,;]", text)
    cut = [piece for part in parts
           for piece in (JOINERS.split(part) if len(part.split()) >= LONG_TAG_WORDS else [part])]
    tags = [ARTICLES.sub("", piece.strip()) for piece in cut]
    return list(dict.fromkeys(tag for tag in tags if tag))


def is_sentence(caption: str) -> bool:
    """Prose rather than a tag list: many words and few commas."""
    words = caption.split()
    return len(words) >= 6 and caption.count(",") <= len(words) // 6


def is_tag_list(caption: str) -> bool:
    """Comma-separated short phrases, as SD 1.5 likes them."""
    parts = [part.split() for part in caption.split(",") if part.strip()]
    return len(parts) >= 3 and sum(map(len, parts)) / len(parts) <= 3


def sentence_of(tags: list[str]) -> str:
    """Tags listed as one sentence. Capitalised only when it starts with an ordinary word: a
    trigger word or a name keeps its spelling."""
    if not tags:
        return ""
    listed = tags[0] if len(tags) == 1 else ", ".join(tags[:-1]) + " and " + tags[-1]
    first = listed.split()[0]
    if first.isalpha() and first.islower():
        listed = listed[0].upper() + listed[1:]
    return listed + "."


def to_style(caption: str, style: str) -> str:
    """A caption in a family's style (see the module docstring)."""
    text = re.sub(r"\s+", " ", caption).strip()
    if style == "tags":
        return ", ".join(tags_of(text))
    if style == "natural":
        if text and not is_sentence(text) and "," in text:
            return sentence_of(tags_of(text))
        return text if not text or text[-1] in ".!?" else text + "."
    return text


def with_trigger(caption: str, trigger: str, style: str) -> str:
    """The caption in `style` with `trigger`: exactly once and first in a tag list; kept where it
    stands in prose, or put in front when missing."""
    if not trigger:
        return to_style(caption, style)
    pattern = trigger_pattern(trigger)
    if style == "tags":
        rest = [tag for tag in tags_of(caption) if not pattern.fullmatch(tag)]
        rest = [pattern.sub("", tag).strip() for tag in rest]
        return ", ".join([trigger, *(tag for tag in rest if tag)])
    if style == "natural" and not is_sentence(caption) and "," in caption:
        # A tag list becomes a sentence that starts with the trigger, as the trigger tag did; its
        # phrases stay whole ("digital painting of mountains at sunset").
        parts = [pattern.sub("", part).strip() for part in re.split(r"[,;]", caption.strip().rstrip("."))]
        listed = sentence_of(list(dict.fromkeys(part for part in parts if part)))
        return f"{trigger}, {_lower_start(listed)}" if listed else trigger
    text = to_style(caption, style)
    if not pattern.search(text):
        if not text:
            return trigger
        if style == "mixed":  # the guide's SDXL example: "xyz_style digital painting of ..."
            return f"{trigger} {text}"
        return f"{trigger}, {_lower_start(text)}"
    # In prose the trigger stays wherever it stands (dropping a repeat could break the sentence),
    # spelled as given everywhere.
    return pattern.sub(trigger, text)


def _lower_start(text: str) -> str:
    """"A cat" -> "a cat" when it follows the trigger; names and acronyms keep their capitals."""
    first = text.split()[0]
    plain = first.isalpha() and first[0].isupper() and (len(first) == 1 or first[1:].islower())
    return text[0].lower() + text[1:] if plain else text


@dataclass(frozen=True)
class CaptionVariation:
    """How a caption changes each time training uses it (kohya's caption dropout, tag shuffle and
    keep-tokens). Decided by the seed and the batch number alone, so a resumed run sees the same
    captions as one that never stopped."""

    dropout: float = 0.0  # share of uses with an empty caption
    shuffle: bool = False  # shuffle the comma-separated tags...
    keep: int = 1  # ...after the first `keep` (the trigger word)
    seed: int = 0

    def apply(self, caption: str, batch_number: int, position: int) -> str:
        rng = random.Random(f"{self.seed}|{batch_number}|{position}")
        if self.dropout and rng.random() < self.dropout:
            return ""
        if self.shuffle and "," in caption:
            tags = [tag.strip() for tag in caption.split(",")]
            head, tail = tags[:self.keep], tags[self.keep:]
            rng.shuffle(tail)
            return ", ".join(tag for tag in head + tail if tag)
        return caption


def fill_template(template: str, trigger: str, item: ImageItem) -> str:
    return template.format(trigger=trigger, name=item.path.stem, folder=item.folder).strip()


def recaption(dataset: Dataset, trigger: str, family: str, template: str, captioner: Captioner | None = None,
              edits: dict[str, str] | None = None, replace_existing: bool = False) -> Dataset:
    """A new dataset whose captions follow the rules; the input dataset is not changed. `edits`
    (image name -> caption, by file name or folder/file name) come first; a captioner writes the
    missing captions (or all others, with `replace_existing`); the template fills what is left."""
    style = get_family(family).caption_style
    edits = edits or {}
    items = []
    for item in dataset.items:
        named = f"{item.folder}/{item.path.name}" if item.folder else item.path.name
        caption = edits.get(named, edits.get(item.path.name))
        if caption is None:
            caption = "" if replace_existing and captioner is not None else (item.caption if item.captioned else "")
        if not caption.strip() and captioner is not None:
            caption = captioner(item.image if item.image is not None else load_image(item.path))
        caption = caption.strip() or fill_template(template, trigger, item)
        items.append(replace(item, caption=with_trigger(caption, trigger, style), captioned=True))
    return Dataset(items=items, warnings=list(dataset.warnings), trigger_words=[trigger] if trigger else [])
