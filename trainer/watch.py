"""Watching a run learn, between its steps: the validation loss on held-out images and sample images
of fixed prompts, each on its schedule and at every checkpoint; and, at the end, the guide's
diagnosis of the curve and the checkpoint to use.

The recommendation follows the guide ("choose the best one, not just the last one"): the checkpoint
with the lowest validation loss where the run has validation; without it, the one nearest the
lowest smoothed loss when the curve says overfitting, else the last.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .diagnosis import Diagnosis, diagnose
from .files import atomic_save_image
from .loop import Checkpoint, SampleSheet, TrainingEvents
from .previews import PreviewSampler
from .sampling import labelled_grid
from .validation import ValidationLoss

log = logging.getLogger(__name__)
VALIDATIONS_PER_RUN = 20  # validation_every = 0: about this many points on the curve


class RunWatch:
    def __init__(self, run_dir: Path, name: str, total_steps: int, events: TrainingEvents,
                 validation: ValidationLoss | None, validation_every: int, sampler: PreviewSampler | None,
                 sample_every: int, history: Sequence[tuple[int, float]] = (), samples: Sequence[dict] = ()) -> None:
        self.run_dir, self.name, self.events = run_dir, name, events
        self.measure, self.sampler = validation, sampler
        self.validation_every = validation_every or max(1, total_steps // VALIDATIONS_PER_RUN)
        self.sample_every = sample_every  # 0: at checkpoints only
        self.validation: list[tuple[int, float]] = [tuple(row) for row in history]
        self.samples: list[dict] = list(samples)
        self.latest_sheet: SampleSheet | None = None

    def __call__(self, step: int, checkpoint_due: bool) -> None:
        if self.measure and (checkpoint_due or step % self.validation_every == 0):
            self.events.on_phase("validating")
            loss = self.measure()
            self.validation.append((step, loss))
            self.events.on_validation(step, loss)
        if self.sampler and (checkpoint_due or (self.sample_every > 0 and step % self.sample_every == 0)):
            self.events.on_phase("sampling")
            images = self.sampler.sample()
            path = self.run_dir / f"{self.name}-step{step:06d}-samples.png"
            atomic_save_image(path, labelled_grid([(f"step {step}", images)], self.sampler.prompts))
            self.samples.append({"step": step, "file": path.name})
            self.latest_sheet = SampleSheet(step, path, images)
            self.events.on_samples(self.latest_sheet)

    def validation_at(self, step: int) -> float | None:
        return next((loss for at, loss in reversed(self.validation) if at == step), None)

    def thumbnail_at(self, step: int):
        """The first sample image made at `step`, or the newest before it (a checkpoint saved at
        Cancel has none of its own), for the checkpoint's metadata; None when nothing was sampled."""
        sheet = self.latest_sheet
        return sheet.images[0] if sheet is not None and sheet.step <= step and sheet.images else None


def diagnose_run(losses: Sequence[tuple[int, float, float]], validation: Sequence[tuple[int, float]],
                 planned: int | None = None) -> Diagnosis:
    return diagnose([loss for _, loss, _ in losses], validation, first_step=losses[0][0] if losses else 1,
                    planned=planned)


def recommend(checkpoints: Sequence[Checkpoint], validation: Sequence[tuple[int, float]],
              diagnosis: Diagnosis) -> Checkpoint | None:
    """The checkpoint to use (see the module docstring)."""
    checkpoints = [c for c in checkpoints if c.step > 0]  # step 0 of a run from a file is where it started
    if not checkpoints:
        return None
    measured = {step: loss for step, loss in validation}
    scored = [(measured[c.step], c.step, c) for c in checkpoints if c.step in measured]
    if scored:
        return min(scored, key=lambda item: (item[0], -item[1]))[2]
    if diagnosis.pattern == "overfitting" and diagnosis.lowest_step is not None:
        return min(checkpoints, key=lambda c: (abs(c.step - diagnosis.lowest_step), -c.step))
    return checkpoints[-1]
