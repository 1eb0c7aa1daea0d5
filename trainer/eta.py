"""How long a run still takes, counting everything it will do: the steps left, and the checkpoints,
validation passes and sample sheets still to come on their schedules.

Each kind of work is timed as it happens; one not yet seen is estimated from the step time: a
forward pass without backward costs about a third of a training step at the same batch size, a
validation pass is one per held-out batch, a sample sheet `sample_steps` for every prompt (twice
with classifier-free guidance). So the time left at step 1 already holds the first save and sample
sheet, not the steps alone. The first step, which also warms up, is not taken as the step time
once a second one is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FORWARD_SHARE = 0.35  # a forward pass without backward, as a share of a training step
SAVE_GUESS = 0.5  # seconds, before the first save is timed


@dataclass(frozen=True)
class Schedule:
    """What a run does between its steps, and how often."""

    total_steps: int
    save_every: int
    validation_every: int = 0  # 0: no validation
    sample_every: int = -1  # -1: no samples; 0: at checkpoints only
    validation_batches: int = 0  # held-out batches per validation pass
    sample_passes: float = 0.0  # forward passes per sample sheet, in training batches (see sample_passes)

    def count(self, every: int, first: int) -> int:
        """Steps from `first` to the end at which work done every `every` steps happens, or at
        each checkpoint too (every = 0: at checkpoints only)."""
        last, save = self.total_steps, self.save_every
        at_saves = _multiples(save, first, last)
        if every <= 0:
            shared = at_saves
        else:
            shared = at_saves + _multiples(every, first, last) - _multiples(math.lcm(save, every), first, last)
        final_too = first <= last and last % save and (every <= 0 or last % every)
        return shared + bool(final_too)


def _multiples(every: int, first: int, last: int) -> int:
    return max(0, last // every - (first - 1) // every)


@dataclass
class RunClock:
    schedule: Schedule
    step_seconds: float | None = None  # the mean step time so far (the first step left out once others exist)
    timed: dict[str, float] = field(default_factory=dict)  # "saving", "validating", "sampling": last duration
    steps_timed: int = 0
    _total: float = 0.0

    def step_done(self, seconds: float) -> None:
        # A mean over the run, not over the last few steps: a step's time swings by half on a busy
        # machine, and the run's remaining steps are many.
        self.steps_timed += 1
        if self.steps_timed > 1:
            self._total += seconds
        self.step_seconds = seconds if self.steps_timed == 1 else self._total / (self.steps_timed - 1)

    def work_done(self, kind: str, seconds: float) -> None:
        self.timed[kind] = seconds

    def cost(self, kind: str) -> float:
        if kind in self.timed:
            return self.timed[kind]
        step = self.step_seconds or 0.0
        if kind == "validating":
            return FORWARD_SHARE * step * max(1, self.schedule.validation_batches)
        if kind == "sampling":
            return FORWARD_SHARE * step * self.schedule.sample_passes
        return SAVE_GUESS

    def remaining(self, step: int) -> float | None:
        """Seconds from the end of `step` to the end of the run (None before any step was timed);
        the work due at `step` itself is still ahead (the loop reports a step, then saves)."""
        if self.step_seconds is None:
            return None
        plan = self.schedule
        seconds = (plan.total_steps - step) * self.step_seconds + plan.count(0, step) * self.cost("saving")
        if plan.validation_every:
            seconds += plan.count(plan.validation_every, step) * self.cost("validating")
        if plan.sample_every >= 0:
            seconds += plan.count(plan.sample_every, step) * self.cost("sampling")
        return seconds


def sample_passes(prompts: int, sample_steps: int, guided: bool, batch_size: int) -> float:
    """A sample sheet's denoiser work in forward passes at the training batch size."""
    return sample_steps * prompts * (2 if guided else 1) / max(1, batch_size)


def batches(images: int, batch_size: int) -> int:
    return math.ceil(images / max(1, batch_size))
