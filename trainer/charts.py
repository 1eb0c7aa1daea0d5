"""The loss chart people read after a run: per-step loss and its moving average against the step,
the validation loss, the learning rate on its own axis, and the checkpoints marked, with labelled
axes and ticks.

Drawn with matplotlib (object API and the Agg canvas: no global pyplot state, safe in a server
thread), which gives readable ticks, a legend and uncut labels that hand-drawn Pillow lines did not.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last `window` values at each point (fewer at the start)."""
    result, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        result.append(total / min(index + 1, window))
    return result


def loss_chart(losses: Sequence[tuple[int, float, float]], title: str = "loss", checkpoints: Sequence[int] = (),
               validation: Sequence[tuple[int, float]] = (), size: tuple[int, int] = (900, 420)) -> Image.Image:
    """Per-step loss (light), its moving average (dark), the validation loss (green), the learning
    rate (right axis) and the checkpoint steps (dotted lines), as a picture `size` pixels large."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if not losses:
        axes.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=axes.transAxes, color="gray")
    else:
        steps = [step for step, _, _ in losses]
        values = [loss for _, loss, _ in losses]
        window = max(3, len(values) // 20)
        axes.plot(steps, values, color="#9ecae1", linewidth=0.8, label="loss per step")
        axes.plot(steps, moving_average(values, window), color="#08519c", linewidth=2,
                  label=f"moving average ({window} steps)")
        if validation:
            axes.plot([step for step, _ in validation], [loss for _, loss in validation], color="#31a354",
                      linewidth=1.5, marker="o", markersize=3, label="validation loss (held-out images)")
        for index, step in enumerate(checkpoints):
            axes.axvline(step, color="#555555", linestyle=":", linewidth=1,
                         label="checkpoint" if index == 0 else None)
        rate = axes.twinx()
        rate.plot(steps, [lr for _, _, lr in losses], color="#e6550d", linewidth=1, alpha=0.7, label="learning rate")
        rate.set_ylabel("learning rate", color="#e6550d")
        rate.tick_params(axis="y", colors="#e6550d")
        rate.set_ylim(bottom=0)
        rate.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lines = axes.get_legend_handles_labels()
        more = rate.get_legend_handles_labels()
        figure.legend(lines[0] + more[0], lines[1] + more[1], loc="outside lower center", ncols=4, fontsize="small",
                      frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
