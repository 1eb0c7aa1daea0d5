"""What a run will use, in words, before it starts: every setting left at 0 ("from the preset", "the
model's own", "auto") said with the value it becomes, and where that value comes from. The training
panel shows it as its plan line while the user is still choosing (nodes/routes.py), and the same
rules resolve the run itself (run.resolve_config), so what is shown is what trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import (
    STEP_RANGES,
    STEPS_PER_IMAGE,
    auto_steps,
    build_config,
    check_family_settings,
    with_preset_values,
)
from .data import validation_count
from .errors import LoraLabError
from .families import all_families, get_family


def plan_line(settings: dict[str, Any], family: str, image_count: int | None) -> str:
    """One line for the panel, e.g. "rank 32 and learning rate 1e-4 from the character preset;
    2,000 steps = 100 x 20 images; alpha 32 (= rank); 512 px (SD 1.5's own); a checkpoint every 500
    steps; 2 of 22 images held out for validation". `image_count` is None while the dataset is
    unknown (Load Dataset has not run yet)."""
    start = "" if settings.get("init_lora") in (None, "", "None") else Path(str(settings["init_lora"])).name
    config = build_config({**settings, "init_lora": start})
    if family:
        try:
            check_family_settings(config, get_family(family))
        except LoraLabError as error:
            return str(error)
    resolved = with_preset_values(config)
    preset = config.train.preset
    source = f"the {preset} preset" if preset != "none" else "the defaults (no preset)"
    filled = [f"{label} {value}" for label, value, given in (
        ("rank", resolved.lora.rank, config.lora.rank or start),
        ("learning rate", rate(resolved.optimizer.learning_rate), config.optimizer.learning_rate)) if not given]
    parts = [f"{' and '.join(filled)} from {source}"] if filled else []
    if start:  # the file decides the adapter's shape (trainer/init_lora.py)
        parts.insert(0, f"type, rank, alpha and layers from {start}, whose weights train on with a new optimizer "
                        "state (not an exact resume)")
    held = 0
    if image_count is not None:
        try:
            held = validation_count(image_count, config.data.validation_images)
        except LoraLabError as error:
            return str(error)
    steps = config.train.steps
    if not steps and image_count is None:
        low, high = STEP_RANGES[preset]
        parts.append(f"steps: {STEPS_PER_IMAGE} per image, {low:,}-{high:,} (run the dataset to see the number)")
    elif not steps:
        steps = auto_steps(preset, image_count - held)
        parts.append(f"{steps:,} steps = {STEPS_PER_IMAGE} x {image_count - held} images, within {source}'s "
                     f"{STEP_RANGES[preset][0]:,}-{STEP_RANGES[preset][1]:,}")
    if not start:
        alpha = config.lora.alpha or resolved.lora.rank
        parts.append(f"alpha {alpha:g}" + (" (= rank)" if not config.lora.alpha else ""))
    if config.lora.train_text_encoder:
        text_rate = config.optimizer.text_encoder_lr or resolved.optimizer.learning_rate / 2
        parts.append(f"the text encoder trains too, at learning rate {rate(text_rate)}"
                     + ("" if config.optimizer.text_encoder_lr else " (half the learning rate)"))
    title = get_family(family).title if family else "the model"
    resolution = config.data.resolution or (get_family(family).default_resolution if family else 0)
    own = ", ".join(f"{f.default_resolution} px for {f.title}" for f in all_families())
    parts.append(f"{resolution} px" + ("" if config.data.resolution else f" ({title}'s own)") if resolution
                 else f"the model's own resolution ({own})")
    if steps:
        every = config.output.save_every or max(1, math.ceil(steps / 4))
        parts.append(f"a checkpoint every {every:,} steps" + ("" if config.output.save_every else " (4 in all)"))
    if config.data.validation_images < 0:
        parts.append("no validation images")
    elif image_count is not None:
        parts.append(f"{held} of {image_count} images held out for validation" if held else
                     "no validation images (too few to hold any out)")
    return "; ".join(parts)


def rate(value: float) -> str:
    """A learning rate as people write it: 1e-4, 5e-5, 2.5e-4 (and 1 for Prodigy)."""
    if value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
