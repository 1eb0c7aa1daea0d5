"""Plain values that flow between LoRA Lab nodes (no ComfyUI import: tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..trainer.data import Dataset
from ..trainer.doctor import DoctorReport


@dataclass(frozen=True)
class DatasetValue:
    """A LORA_LAB_DATASET: the images and captions, where they came from, their fingerprint, and
    the choices made once on Load Dataset that later nodes follow."""

    dataset: Dataset
    source: str  # the folder, or "graph images"
    fingerprint: str
    lora_type: str = "style"  # what the LoRA is for: Train LoRA's preset "from dataset" follows it
    family: str = ""  # the family of the MODEL connected to Load Dataset ("" when none was)
    report: DoctorReport | None = None  # the dataset doctor's findings


@dataclass(frozen=True)
class TrainingRun:
    """A LORA_LAB_RUN: every checkpoint a Train LoRA run saved, oldest first."""

    name: str
    checkpoints: tuple[tuple[int, Path], ...]  # (step, file)
    trigger_words: tuple[str, ...]
    stopped: bool = False
    best_step: int | None = None  # the recommended checkpoint (lowest validation loss, else the guide's rule)

    @property
    def final(self) -> Path:
        return self.checkpoints[-1][1]

    @property
    def best(self) -> Path:
        """The recommended checkpoint's file (the last one when the run recommended none)."""
        return next((path for step, path in self.checkpoints if step == self.best_step), self.final)


# A LORA_STACK entry, as Efficiency/Comfyroll packs pass it: (lora name, model strength, clip strength).
StackEntry = tuple[str, float, float]
