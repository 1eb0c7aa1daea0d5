"""Resume files: everything a run needs to continue at the exact next step, written beside each
checkpoint and read back without ever unpickling anything.

A `<checkpoint>.resume` file is a safetensors file (tensors: LoRA weights in fp32, optimizer
moments, RNG states) whose metadata holds the rest as JSON: step, batch number, scheduler and
grad-scaler state, losses so far, the resolved config and a listing of the dataset. The suffix
is not `.safetensors` so LoRA lists (ComfyUI's among them) do not offer it as a LoRA.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Dataset
from .errors import LoraLabError
from .files import atomic_write
from .lora_files import read_header

SUFFIX = ".resume"
FORMAT_VERSION = 1
# Settings that may differ on resume without changing what is trained (the dataset folder may move:
# its contents are compared instead).
NEUTRAL_SETTINGS = frozenset({"dataset", "resume", "resume_with_changes", "overwrite", "output_dir", "name",
                              "cache_dir", "save_every", "prompts", "strengths", "sample_steps", "guidance_scale",
                              "sample_seed", "sample_every", "validation_every"})


@dataclass
class RunState:
    """A run between two steps. The loop fills the progress fields, the job the identity fields."""

    step: int
    batch_number: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    losses: list[tuple[int, float, float]]
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"step", "file"} of each saved sample sheet
    # Every checkpoint of the run up to this one, across earlier resumes: {"step", "file", "final"}.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    # The resolved config with local paths cut to their names (TrainingConfig.shareable): a resume
    # file may be shared with the run, and a moved run folder resumes as well.
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: list[list[Any]] = field(default_factory=list)  # [name, bytes, repeats, caption] per image
    history: list[dict[str, Any]] = field(default_factory=list)  # settings changed on earlier resumes


def state_path(checkpoint: Path) -> Path:
    """The resume file of a LoRA checkpoint file."""
    return checkpoint.with_suffix(SUFFIX)


def capture_rng(noise: torch.Generator) -> dict[str, Any]:
    state = {"noise": noise.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], noise: torch.Generator) -> None:
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dataset_listing(dataset: Dataset, prefix: str = "") -> list[list[Any]]:
    """What identifies each training image: name (after `prefix`, e.g. for regularisation images),
    size in bytes (or content hash), repeats, caption, and its mask where it has a mask file or one
    from the graph."""
    listing = []
    for item in dataset.items:
        if item.image is not None:
            identity: Any = item.content_hash()[:16]
        else:
            identity = item.path.stat().st_size if item.path.exists() else -1
        row = [prefix + (f"{item.folder}/{item.path.name}" if item.folder else item.path.name), identity,
               item.repeats, item.caption]
        if item.mask_source in ("file", "graph"):
            row.append(item.mask_hash()[:16])
        listing.append(row)
    return listing


# --- a tree of tensors and plain values <-> safetensors + JSON ------------------------------------

def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):  # keys kept with their types: optimizer states are keyed by int
        return {"dict": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a resume file")


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "ndarray" in value:
        return np.asarray(value["ndarray"], dtype=value["dtype"])
    if "tuple" in value:
        return tuple(_unpack(v, tensors) for v in value["tuple"])
    return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["dict"]}


def write_state(path: Path, state: RunState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _pack({name: getattr(state, name) for name in state.__dataclass_fields__}, tensors)
    metadata = {"lora_lab.resume_version": str(FORMAT_VERSION), "lora_lab.step": str(state.step),
                "lora_lab.resume_state": json.dumps(tree)}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def read_state(path: Path) -> RunState:
    """A resume file's state, or a clear error when it is missing, damaged or not one."""
    if not path.is_file():
        raise LoraLabError(f"Resume file {path} does not exist; it is written beside each checkpoint "
                           f"(<checkpoint name>{SUFFIX}). Choose a checkpoint that has one, or start a new run.")
    read_header(path, suffixes=(SUFFIX,))  # a damaged or hostile file is refused before any tensor is read
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if metadata.get("lora_lab.resume_version") != str(FORMAT_VERSION):
            raise ValueError("not a LoRA Lab resume file of this version")
        values = _unpack(json.loads(metadata["lora_lab.resume_state"]), tensors)
        return RunState(**{name: value for name, value in values.items() if name in RunState.__dataclass_fields__})
    except Exception as error:  # safetensors and json raise several types for one problem: a bad file
        raise LoraLabError(f"Resume file {path.name} cannot be read ({error}). Resume from an earlier "
                           "checkpoint of the run instead.") from None


def latest_state(run_dir: Path) -> Path:
    """The resume file of the run's newest checkpoint."""
    candidates = []
    for path in run_dir.glob(f"*{SUFFIX}") if run_dir.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as handle:
                candidates.append((int(handle.metadata()["lora_lab.step"]), path))
        except Exception:  # noqa: BLE001 - a damaged file is skipped; an older complete one may remain
            continue
    if not candidates:
        raise LoraLabError(f"Nothing to resume in {run_dir}: no readable {SUFFIX} files. Check the run name, or "
                           "turn resume off to start a new run.")
    return max(candidates)[1]


# --- what changed since the saved state -------------------------------------------------------------

def settings_changes(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """'name: old -> new' for every setting that changes what is trained."""
    old = {name: value for section in saved.values() for name, value in section.items()}
    new = {name: value for section in current.values() for name, value in section.items()}
    # A setting the saved run did not know yet (a newer version of LoRA Lab) is not a change.
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(set(old) & set(new))
            if name not in NEUTRAL_SETTINGS and _comparable(old.get(name)) != _comparable(new.get(name))]


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def dataset_changes(saved: list[list[Any]], current: list[list[Any]]) -> list[str]:
    """A short account of images added, removed, replaced, re-captioned or re-weighted."""
    before, after = {row[0]: row for row in saved}, {row[0]: row for row in current}
    changes = []
    for label, names in (("added", sorted(set(after) - set(before))), ("removed", sorted(set(before) - set(after)))):
        if names:
            changes.append(f"{len(names)} image(s) {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    common = sorted(set(before) & set(after))
    for index, label in ((1, "replaced"), (2, "with other repeats"), (3, "re-captioned"), (4, "with another mask")):
        names = [name for name in common if before[name][index:index + 1] != after[name][index:index + 1]]
        if names:
            changes.append(f"{len(names)} image(s) {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return changes
