"""Reading a loss curve the way the guide's "Diagnosing from Loss Curves" table does.

Diffusion loss is noisy from step to step (each step draws a new timestep), so the curve is
judged on its moving average: its start, its lowest point and its end.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .charts import moving_average

ADVICE = {
    "too_short": "Too few steps to judge the loss curve.",
    "working": "Loss is decreasing steadily: training is working; continue as planned.",
    "flat": "Loss is flat from the start: learning is too slow; increase the learning rate (e.g. 2e-4-3e-4).",
    "overfitting": "Loss dropped, then rose: overfitting; use an earlier checkpoint (the one near the lowest "
                   "loss) or train fewer steps.",
    "erratic": "Loss is erratic: the learning rate is probably too high; reduce it.",
    "spikes": "Loss spikes suddenly: check the dataset for corrupt or odd images and review the settings.",
}


def classify_loss(losses: Sequence[float]) -> str:
    """One of ADVICE's keys for a sequence of per-step losses."""
    if len(losses) < 20:
        return "too_short"
    # Per-step diffusion losses vary several-fold with the timestep drawn; a spike stands far
    # above even the high ones.
    high = sorted(losses)[int(0.95 * (len(losses) - 1))]
    if max(losses) > 5 * high:
        return "spikes"
    window = max(5, len(losses) // 10)
    smooth = moving_average(losses, window)[window - 1:]
    head = statistics.fmean(smooth[: max(1, len(smooth) // 10)])
    tail = statistics.fmean(smooth[-max(1, len(smooth) // 10):])
    if _swings(losses) >= 3:
        return "erratic"
    lowest_index = min(range(len(smooth)), key=smooth.__getitem__)
    lowest = smooth[lowest_index]
    if lowest_index < 0.8 * len(smooth) and tail > lowest * 1.15 and tail > head * 0.9:
        return "overfitting"
    if tail < head * 0.97:
        return "working"
    return "flat"


def _swings(losses: Sequence[float], chunks: int = 20, threshold: float = 0.15) -> int:
    """How often the curve, seen as `chunks` averages, turns around after moving more than
    `threshold` of its mean (a zigzag count: one turn is a dip, several are oscillation)."""
    size = max(1, len(losses) // chunks)
    means = [statistics.fmean(losses[i:i + size]) for i in range(0, len(losses) - size + 1, size)]
    step = threshold * statistics.fmean(means)
    turns, direction = 0, 0
    high = low = means[0]  # extremes since the last turn
    for value in means[1:]:
        high, low = max(high, value), min(low, value)
        if direction <= 0 and value - low > step:
            turns += direction < 0
            direction, high = 1, value
        elif direction >= 0 and high - value > step:
            turns += direction > 0
            direction, low = -1, value
    return turns


def diagnose_loss(losses: Sequence[float]) -> str:
    return ADVICE[classify_loss(losses)]
