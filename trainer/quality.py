"""A dataset's quality report, measured against the guide: image count for the kind of LoRA,
resolution, captions and the trigger word."""

from __future__ import annotations

from .data import Dataset

# The guide's "How Many Images Do You Need?" table: (minimum, recommended low, recommended high).
IMAGE_COUNTS = {"style": (10, 20, 50), "character": (15, 30, 100), "object": (10, 20, 40),
                "likeness": (20, 40, 100)}


def has_trigger(caption: str, trigger: str) -> bool:
    return trigger.lower() in caption.lower()


def quality_report(dataset: Dataset, lora_type: str, trigger: str, resolution: int) -> str:
    """A few lines a user can act on; the first says whether the dataset is ready."""
    items = dataset.items
    minimum, low, high = IMAGE_COUNTS[lora_type]
    problems, notes = [], []
    count = len(items)
    if count < minimum:
        problems.append(f"{count} images: a {lora_type} LoRA needs at least {minimum} ({low}-{high} recommended).")
    elif count < low:
        notes.append(f"{count} images: enough to start; {low}-{high} are recommended for a {lora_type} LoRA.")
    else:
        notes.append(f"{count} images: within or above the {low}-{high} recommended for a {lora_type} LoRA.")
    small = [i.path.name for i in items if min(i.size) < resolution]
    if small:
        notes.append(f"{len(small)} below {resolution} px on the short side (upscaled in training): "
                     f"{_names(small)}.")
    uncaptioned = [i.path.name for i in items if not i.captioned]
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} without a caption file: {_names(uncaptioned)}. "
                        "Add .txt captions or use the Caption node.")
    if trigger:
        missing = [i.path.name for i in items if not has_trigger(i.caption, trigger)]
        if missing:
            problems.append(f"{len(missing)} captions lack the trigger word {trigger!r}: {_names(missing)}. "
                            "The Caption node can add it.")
    else:
        problems.append("No trigger word: set one (e.g. xyz_style) so the LoRA can be switched on in prompts.")
    skipped = [w for w in dataset.warnings if w.startswith("Skipped")]
    if skipped:
        notes.append(f"{len(skipped)} files skipped: " + " ".join(skipped[:3]))
    head = "Ready to train." if not problems else f"{len(problems)} problem(s) to fix before training:"
    return "\n".join([head, *("- " + p for p in problems), *("- " + n for n in notes)])


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
