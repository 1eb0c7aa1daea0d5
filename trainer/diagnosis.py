"""Reading a run's loss the way the guide's "Diagnosing from Loss Curves" table does, with
statistics that respect how noisy diffusion loss is.

Each step's loss depends on the timestep and noise it drew: in real runs its coefficient of
variation is 0.6-1.0 within any stretch of 50 steps, so a single step says almost nothing. The
curve is judged on window means, each with its standard error measured from the steps inside it:

- spikes: single steps over 12 times the mean of the 60 around them, as a corrupt image or a
  numerical fault gives (real per-step noise stays within about 5 times);
- erratic: window means that jump around far more than their standard errors allow: their local
  second differences, in units of what noise alone gives, average over 2.5 at some scale (20, 40 or
  80 windows; the two largest left out, so one kink, as overfitting makes, does not count), as a
  learning rate that is too high gives; per-step noise alone stays near 1;
- overfitting: on the validation loss where the run has one (held-out images, fixed noise: it only
  moves when the model does), else on the training loss, a minimum well before the end and a
  significant rise after it. Read on the validation loss it comes first: images the LoRA never
  trained on got worse, and going back to the earlier checkpoint helps whatever else is wrong;
- working: a significant fall from the start to the end; flat: none.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_STEPS = 30
# A run stopped early is judged flat only once it has this many steps (or this share of its plan):
# a LoRA starts as the base model, and its first steps often move the loss little.
FLAT_MIN_STEPS = 100
FLAT_MIN_SHARE = 0.4
SPIKE_RATIO = 12.0  # a spike is this many times the mean of the steps around it
SPIKE_NEIGHBOURS = 30  # steps on each side
ERRATIC_DISPERSION = 2.5  # squared second difference of window means, in units of what noise alone gives
ERRATIC_SCALES = (20, 40, 80)  # windows per run at which oscillation is looked for
SIGNIFICANT = 2.0  # z-score for a fall or rise to count
MIN_FALL = 0.05  # and it must be at least 5 % of the level
MIN_RISE = 0.10  # a rise after the minimum, relative to it (training loss)
MIN_VALIDATION_RISE = 0.03  # validation loss has no sampling noise: smaller rises are real

ADVICE = {
    "too_short": "Too few steps to judge the loss curve.",
    "working": "Loss is decreasing steadily: training is working; continue as planned.",
    "flat": "Loss is flat from the start: learning is too slow; increase the learning rate (e.g. 2e-4-3e-4) or "
            "train longer.",
    "overfitting": "Loss dropped, then rose: overfitting; use the earlier checkpoint recommended below, or train "
                   "fewer steps or with a lower learning rate.",
    "erratic": "Loss is erratic, swinging far more than per-step noise explains: the learning rate is probably too "
               "high; reduce it (e.g. halve it).",
    "spikes": "Loss spikes suddenly: check the dataset for corrupt or odd images and review the settings.",
}


@dataclass(frozen=True)
class Diagnosis:
    pattern: str  # a key of ADVICE
    advice: str
    evidence: str  # the numbers behind it
    lowest_step: int | None = None  # where the judged curve was lowest (for overfitting: the step to go back to)

    def __str__(self) -> str:
        return f"{self.advice} ({self.evidence})" if self.evidence else self.advice


@dataclass(frozen=True)
class Window:
    start: int  # index of the first step in the window
    mean: float
    error: float  # standard error of the mean


def windows(losses: Sequence[float], count: int) -> list[Window]:
    size = len(losses) // count
    result = []
    for k in range(count):
        part = losses[k * size:(k + 1) * size if k < count - 1 else len(losses)]
        spread = statistics.stdev(part) if len(part) > 1 else 0.0
        result.append(Window(k * size, statistics.fmean(part), spread / math.sqrt(len(part))))
    return result


def find_spikes(losses: Sequence[float]) -> list[int]:
    """Steps far above the mean of the steps around them."""
    spikes, total = [], [0.0]
    for loss in losses:
        total.append(total[-1] + loss)
    for i, loss in enumerate(losses):
        low, high = max(0, i - SPIKE_NEIGHBOURS), min(len(losses), i + 1 + SPIKE_NEIGHBOURS)
        around = (total[high] - total[low] - loss) / max(1, high - low - 1)
        if loss > SPIKE_RATIO * around:
            spikes.append(i)
    return spikes


def dispersion(parts: Sequence[Window]) -> float:
    """Mean squared local second difference of the window means, in units of what their standard
    errors alone would give (the two largest left out): about 1 for a smooth curve with noise, far
    more for oscillation."""
    ratios = []
    for before, here, after in zip(parts, parts[1:], parts[2:], strict=False):
        wobble = here.mean - (before.mean + after.mean) / 2
        expected = here.error ** 2 + (before.error ** 2 + after.error ** 2) / 4
        ratios.append(wobble ** 2 / max(expected, 1e-24))
    kept = sorted(ratios)[:-2]
    return statistics.fmean(kept) if kept else 0.0


def oscillation(losses: Sequence[float]) -> float:
    """The largest dispersion over the scales at which a run is looked at."""
    scales = [count for count in ERRATIC_SCALES if len(losses) // count >= 8]
    return max((dispersion(windows(losses, count)) for count in scales), default=0.0)


def _z(a: Window, b: Window) -> float:
    return (a.mean - b.mean) / max(math.sqrt(a.error ** 2 + b.error ** 2), 1e-12)


def _judge_trend(head: Window, points: Sequence[Window], tail: Window, steps: Sequence[int],
                 min_rise: float) -> tuple[str, str, int]:
    """working / flat / overfitting from the start, the points along the way, and the end."""
    lowest = min(range(len(points)), key=lambda i: points[i].mean)
    low = points[lowest]
    evidence = (f"{head.mean:.4g} at the start, lowest {low.mean:.4g} at step {steps[lowest]}, "
                f"{tail.mean:.4g} at the end")
    rose_after_a_fall = _z(tail, low) > SIGNIFICANT and _z(head, low) > SIGNIFICANT
    rise = (tail.mean - low.mean) / max(low.mean, 1e-12)
    if lowest < 0.75 * (len(points) - 1) and rise > min_rise and rose_after_a_fall:
        return "overfitting", evidence, steps[lowest]
    if (head.mean - tail.mean) / max(head.mean, 1e-12) > MIN_FALL and _z(head, tail) > SIGNIFICANT:
        return "working", evidence, steps[lowest]
    return "flat", evidence, steps[lowest]


def diagnose(losses: Sequence[float], validation: Sequence[tuple[int, float]] = (),
             first_step: int = 1, planned: int | None = None) -> Diagnosis:
    """The guide's reading of a run: per-step training losses (step `first_step` first) and,
    where the run has one, its validation loss as (step, loss); `planned` is the run's length
    (a run stopped early is not called flat before it has had a fair share of its steps)."""
    if len(losses) < MIN_STEPS:
        return Diagnosis("too_short", ADVICE["too_short"], f"{len(losses)} steps")
    found = _diagnose(losses, validation, first_step)
    needed = max(FLAT_MIN_STEPS, math.ceil(FLAT_MIN_SHARE * planned)) if planned else 0
    if found.pattern == "flat" and len(losses) < min(needed, planned or 0):
        return Diagnosis("too_short", ADVICE["too_short"], f"{len(losses)} of {planned} steps; a flat curve is "
                         f"judged from step {needed} on")
    return found


def _diagnose(losses: Sequence[float], validation: Sequence[tuple[int, float]], first_step: int) -> Diagnosis:
    held_out = None
    if len(validation) >= 3:
        # Fixed noise and timesteps: a point moves only with the model, so its error is its rounding.
        points = [Window(0, loss, abs(loss) * 1e-4) for _, loss in validation]
        pattern, evidence, lowest = _judge_trend(points[0], points, points[-1], [step for step, _ in validation],
                                                 MIN_VALIDATION_RISE)
        held_out = Diagnosis(pattern, ADVICE[pattern], "validation loss " + evidence, lowest)
    spikes = find_spikes(losses)
    spiked = ", ".join(str(first_step + i) for i in spikes[:5])
    if held_out and held_out.pattern == "overfitting":
        # Images the LoRA never trained on got worse: the most direct evidence there is, and going
        # back to the earlier checkpoint helps whatever else the training loss shows.
        also = f"; the training loss also spiked at step {spiked}" if spikes else ""
        return Diagnosis(held_out.pattern, held_out.advice, held_out.evidence + also, held_out.lowest_step)
    if spikes:
        return Diagnosis("spikes", ADVICE["spikes"], f"at step {spiked}")
    spread = oscillation(losses)
    if spread > ERRATIC_DISPERSION:
        return Diagnosis("erratic", ADVICE["erratic"], f"windows of steps swing {math.sqrt(spread):.1f}x more "
                                                       "than per-step noise explains")
    if held_out:
        return held_out
    # The start and the end as fifths of the run (a single window is too noisy), the way as tenths.
    fifths, tenths = windows(losses, 5), windows(losses, 10)
    pattern, evidence, lowest = _judge_trend(fifths[0], tenths, fifths[-1], [first_step + w.start for w in tenths],
                                             MIN_RISE)
    return Diagnosis(pattern, ADVICE[pattern], "mean loss " + evidence, lowest)


def classify_loss(losses: Sequence[float]) -> str:
    return diagnose(losses).pattern


def diagnose_loss(losses: Sequence[float]) -> str:
    return str(diagnose(losses))
