"""Plain values that flow between LoRA Lab nodes (no ComfyUI import: tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..trainer.data import Dataset


@dataclass(frozen=True)
class DatasetValue:
    """A LORA_LAB_DATASET: the images and captions, where they came from, and their fingerprint."""

    dataset: Dataset
    source: str  # the folder, or "graph images"
    fingerprint: str


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
