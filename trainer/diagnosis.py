"""Reading a loss curve the way the guide's "Diagnosing from Loss Curves" table does.

Diffusion loss is noisy from step to step (each step draws a new timestep), so the curve is
judged on its moving average: its start, its lowest point and its end.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .sampling import moving_average

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
    median = statistics.median(losses)
    if max(losses) > 10 * median:
        return "spikes"
    window = max(5, len(losses) // 10)
    smooth = moving_average(losses, window)[window - 1:]
    head = statistics.fmean(smooth[: max(1, len(smooth) // 10)])
    tail = statistics.fmean(smooth[-max(1, len(smooth) // 10):])
    lowest_index = min(range(len(smooth)), key=smooth.__getitem__)
    lowest = smooth[lowest_index]
    if lowest_index < 0.8 * len(smooth) and tail > lowest * 1.15 and tail > head * 0.9:
        return "overfitting"
    step_changes = [abs(b - a) for a, b in zip(smooth, smooth[1:], strict=False)]
    if statistics.fmean(step_changes) > 0.05 * statistics.fmean(smooth):
        return "erratic"
    if tail < head * 0.97:
        return "working"
    return "flat"


def diagnose_loss(losses: Sequence[float]) -> str:
    return ADVICE[classify_loss(losses)]
