"""Train again from a LoRA file: the settings a LoRA Lab file records (`lora_lab.config` in its
metadata), on a new dataset, with whatever the command line sets on top, and the differences said.

The file keeps only the names of the folders and files it was trained from (the config is shared
with the file), so the new dataset, and the base model unless it was the embedded one, are given
again. A file from another tool records no such settings and is refused with what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import TrainingConfig, field_specs
from .errors import LoraLabError
from .files import read_metadata


def recorded_settings(path: Path) -> dict[str, Any]:
    """The plain-named settings a LoRA Lab file was trained with, as recorded (folder and file
    settings hold names only)."""
    if not path.is_file():
        raise LoraLabError(f"--from-lora {path}: no such file.")
    try:
        metadata = read_metadata(path)
    except (LoraLabError, OSError, ValueError) as error:
        raise LoraLabError(f"--from-lora {path.name}: not a readable .safetensors LoRA ({error}).") from None
    text = metadata.get("lora_lab.config")
    if not text:
        made_by = ("kohya-style metadata (ss_*) but no LoRA Lab settings"
                   if any(key.startswith("ss_") for key in metadata) else "no training metadata")
        raise LoraLabError(f"--from-lora {path.name} holds {made_by}: only a LoRA trained by LoRA Lab records "
                           "its settings (lora_lab.config). Give the settings with --config or flags instead.")
    try:
        nested = json.loads(text)
        return {name: nested[section][name] for name, (section, _) in field_specs().items()
                if name in nested.get(section, {})}
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise LoraLabError(f"--from-lora {path.name}: its lora_lab.config is damaged; give the settings with "
                           "--config or flags instead.") from None


def retrain_settings(path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of a new run from `path` on a new dataset: the recorded ones without their
    local paths (and without resume), then `given` (the config file's and the flags') on top."""
    recorded = recorded_settings(path)
    if not given.get("dataset"):
        raise LoraLabError(f"--from-lora trains {path.name}'s settings on a new dataset: give --dataset FOLDER.")
    base = recorded.get("base_model", "")
    if base and not given.get("base_model"):
        raise LoraLabError(f"{path.name} was trained on {base}; the file records only that name, not where it "
                           "is: give --base-model PATH.")
    paths = {name for name, (_, spec) in field_specs().items() if spec.metadata["path"]}
    settings = {name: value for name, value in recorded.items() if name not in paths}
    settings["name"] = f"{recorded.get('name', 'lora')}_again"  # a new run beside the old one
    return {**settings, **given}


def differences(path: Path, config: TrainingConfig) -> list[str]:
    """'setting: recorded → now' for each setting the new run changes (paths compared by name)."""
    recorded = recorded_settings(path)
    now = json.loads(json.dumps(config.shareable()))  # tuples as the file's lists
    return [f"{name}: {recorded[name]!r} → {value!r}" for values in now.values() for name, value in values.items()
            if name in recorded and name != "resume" and recorded[name] != value]
