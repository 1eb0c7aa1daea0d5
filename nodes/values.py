"""Plain values that flow between LoRA Lab nodes (no ComfyUI import: tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trainer.data import Dataset
from ..trainer.doctor import DoctorReport
from ..trainer.errors import LoraLabError
from ..trainer.files import read_metadata
from ..trainer.metadata import trigger_words


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
    trigger_word: str = ""  # typed once, on Load Dataset (or Caption): captions and Train LoRA use it
    purpose: str = "training"  # or "regularisation": class images for Train LoRA's reg_dataset


CHECKPOINT_CHOICES = "all, latest, best, or step numbers separated by commas"


@dataclass(frozen=True)
class TrainingRun:
    """A LORA_LAB_RUN: every checkpoint a Train LoRA run saved so far, oldest first. A background
    run that is still training carries the checkpoints saved when Train LoRA last ran; queueing
    again after a new one lands brings it (Train LoRA's fingerprint changes)."""

    name: str
    checkpoints: tuple[tuple[int, Path], ...]  # (step, file)
    trigger_words: tuple[str, ...]
    stopped: bool = False
    best_step: int | None = None  # the recommended checkpoint (lowest validation loss, else the guide's rule)
    training: bool = False  # a background job still training

    @classmethod
    def from_journal(cls, run_dir: Path, journal: dict[str, Any]) -> TrainingRun:
        """A finished or stopped run as its folder tells it: every checkpoint whose file is there
        (across resumes), its trigger words and the recommended checkpoint."""
        checkpoints = tuple((row["step"], run_dir / row["file"]) for row in journal.get("checkpoints") or []
                            if (run_dir / row["file"]).is_file())
        words = journal.get("trigger_words")
        if words is None and checkpoints:  # a journal from before it recorded them: the file says
            words = trigger_words(read_metadata(checkpoints[-1][1]))
        best = (journal.get("best") or {}).get("step")
        return cls(run_dir.name, checkpoints, tuple(words or ()), journal.get("status") == "stopped", best)

    @property
    def final(self) -> Path:
        return self.checkpoints[-1][1]

    @property
    def best(self) -> Path:
        """The recommended checkpoint's file (the last one when the run recommended none)."""
        return self.choose("best")[0][1]

    def choose(self, choice: str) -> list[tuple[int, Path]]:
        """The checkpoints a node asked for: all, latest, best (the recommended one so far), or
        step numbers ("500, 1000"). Errors say what exists."""
        if not self.checkpoints:
            raise LoraLabError(f"Run {self.name!r} has no checkpoint yet" + (
                ": it is training in the background. Queue again once its panel shows the first checkpoint."
                if self.training else "."))
        choice = choice.strip().lower() or "all"
        if choice == "all":
            return list(self.checkpoints)
        if choice == "latest":
            return [self.checkpoints[-1]]
        if choice == "best":
            return [next(((s, p) for s, p in self.checkpoints if s == self.best_step), self.checkpoints[-1])]
        saved = dict(self.checkpoints)
        try:
            steps = [int(part) for part in choice.replace(";", ",").split(",") if part.strip()]
            if not steps:
                raise ValueError(choice)
        except ValueError:
            raise LoraLabError(f"checkpoint {choice!r}: use {CHECKPOINT_CHOICES}.") from None
        missing = [step for step in steps if step not in saved]
        if missing:
            raise LoraLabError(f"Run {self.name!r} has no checkpoint at step {', '.join(map(str, missing))}; it has "
                               f"steps {', '.join(str(s) for s, _ in self.checkpoints)}"
                               + (" so far (it is still training)." if self.training else "."))
        return [(step, saved[step]) for step in steps]


# A LORA_STACK entry, as Efficiency/Comfyroll packs pass it: (lora name, model strength, clip strength).
StackEntry = tuple[str, float, float]
