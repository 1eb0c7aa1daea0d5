"""The training panel's websocket events (web/lora_lab.js listens to them), made from the loop's
events. A foreground run (comfy_bridge.NodeEvents) and a background job (jobs.JobEvents) both send
them; `send(event, data)` is ComfyUI's broadcast to every open browser tab."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from ..trainer.loop import Checkpoint, SampleSheet, StepReport, TrainingEvents
from ..trainer.metadata import thumbnail_url

SAMPLE_PREVIEW_WIDTH = 480  # the sample sheet as the training panel shows it


class PanelEvents(TrainingEvents):
    def __init__(self, node_id: str | None, run: str, send: Callable[[str, dict], None]) -> None:
        self.node_id, self.run, self.send = node_id, run, send

    def event(self, kind: str, **data: Any) -> None:
        self.send(f"lora_lab.{kind}", {"node": self.node_id, "run": self.run, **data})

    def on_start(self, first_step: int, total_steps: int, checkpoints: list[Checkpoint]) -> None:
        self.event("start", first_step=first_step, total=total_steps,
                   checkpoints=[{"step": c.step, "file": c.path.name} for c in checkpoints])

    def on_step(self, report: StepReport) -> None:
        self.event("progress", step=report.step, total=report.total_steps, loss=report.loss,
                   lr=report.learning_rate, seconds_per_step=report.seconds_per_step, eta=report.eta_seconds)

    def on_phase(self, phase: str) -> None:
        self.event("phase", phase=phase)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.event("checkpoint", step=checkpoint.step, file=checkpoint.path.name)

    def on_validation(self, step: int, loss: float) -> None:
        self.event("validation", step=step, loss=loss)

    def on_samples(self, sheet: SampleSheet) -> None:
        with Image.open(sheet.path) as picture:
            self.event("sample", step=sheet.step, image=thumbnail_url(picture, SAMPLE_PREVIEW_WIDTH))

    def status(self, status: str, message: str = "", **extra: Any) -> None:
        """The run's state for the panel: training, paused, finished, stopped or failed."""
        self.event("status", status=status, message=message, **extra)
