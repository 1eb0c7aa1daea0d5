"""A run's story on disk, in its run folder, for people and for any program that shows the run:

- `<name>-loss.csv`: step, loss, learning rate and (where measured) validation loss, a row a step;
- `<name>-run.json`: the run's state: status (training, finished, stopped, failed) with its
  message, step and total, seconds per step, checkpoints, validation losses, sample sheets, and at
  the end the diagnosis and the recommended checkpoint; and who started it (the ComfyUI node).

Both are rewritten whole through a temporary file and a rename (never appended in place), so a
reader, a crash or a kill always finds complete files. Rewriting every step would cost a disk
flush per step, so between checkpoints they are written at most once per `interval` seconds; a
checkpoint and the end of the run always write them. A page reloaded in the middle of a run, or
opened in a second browser, reads the whole curve from here (nodes/routes.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .diagnosis import Diagnosis
from .eta import RunClock, Schedule
from .files import atomic_write_text
from .loop import Checkpoint, SampleSheet, StepReport, TrainingEvents
from .parallel import processes

log = logging.getLogger(__name__)

LOSS_HEADER = "step,loss,lr,val_loss"
FORMAT_VERSION = 1
STATUSES = ("training", "finished", "stopped", "failed")


def loss_log_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}-loss.csv"


def journal_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}-run.json"


def checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"step": checkpoint.step, "file": checkpoint.path.name, "final": checkpoint.final}


class RunJournal(TrainingEvents):
    """Records every event of the loop in the run folder, then passes it on to `inner`."""

    def __init__(self, run_dir: Path, name: str, total_steps: int, inner: TrainingEvents,
                 losses: list[tuple[int, float, float]], owner: dict[str, Any] | None = None,
                 validation: list[tuple[int, float]] = (), samples: list[dict] = (),
                 checkpoints: list[Checkpoint] = (), trigger_words: tuple[str, ...] = (),
                 interval: float = 1.0) -> None:
        self.run_dir, self.name, self.inner, self.interval = run_dir, name, inner, interval
        self.losses = list(losses)  # a resumed run's log holds exactly its steps so far, never a discarded future
        self.state: dict[str, Any] = {
            "version": FORMAT_VERSION, "name": name, "status": "training", "message": "",
            "step": self.losses[-1][0] if self.losses else 0, "total_steps": total_steps, "seconds_per_step": None,
            "started": time.time(), "updated": time.time(), "owner": owner or {},
            "checkpoints": [checkpoint_row(c) for c in checkpoints], "trigger_words": list(trigger_words),
            "validation": [list(row) for row in validation], "samples": list(samples), "diagnosis": None,
            "best": None}
        self._written_at = 0.0
        self.writes = processes().main  # with several training processes, the main one alone writes
        self.clock: RunClock | None = None  # the time left (set once the run's schedule is known)
        self._phase: tuple[str, float] | None = None  # work between steps under way, and since when
        self.flush(force=True)

    def started_from(self, message: str) -> None:
        """Where a run from an existing file started (trainer/init_lora.py), said once."""
        log.info(message)
        self.state["started_from"] = message
        self.flush(force=True)

    def plan(self, schedule: Schedule) -> None:
        """What the run will do between its steps, so the time left counts it."""
        self.clock = RunClock(schedule)

    # --- the loop's events -------------------------------------------------------------------
    def on_start(self, first_step: int, total_steps: int, checkpoints: list[Checkpoint]) -> None:
        self.inner.on_start(first_step, total_steps, checkpoints)

    def on_step(self, report: StepReport) -> None:
        self.losses.append((report.step, report.loss, report.learning_rate))
        if self.clock is not None:
            self.clock.step_done(report.seconds_per_step)
            report = dataclasses.replace(report, eta_seconds=self.clock.remaining(report.step))
        speed = self.state["seconds_per_step"]  # smoothed, so one slow step does not swing the ETA
        self.state.update(step=report.step, seconds_per_step=report.seconds_per_step if speed is None
                          else 0.8 * speed + 0.2 * report.seconds_per_step, eta_seconds=report.eta_seconds,
                          phase=None)
        self.flush()
        self.inner.on_step(report)

    def on_phase(self, phase: str) -> None:
        self._phase = (phase, time.monotonic())
        self.state["phase"] = phase
        self.flush()
        self.inner.on_phase(phase)

    def _phase_done(self, phase: str) -> None:
        if self._phase and self._phase[0] == phase and self.clock is not None:
            self.clock.work_done(phase, time.monotonic() - self._phase[1])
        self._phase, self.state["phase"] = None, None

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._phase_done("saving")
        self.state["checkpoints"].append(checkpoint_row(checkpoint))
        self.flush(force=True)
        self.inner.on_checkpoint(checkpoint)

    def on_validation(self, step: int, loss: float) -> None:
        self._phase_done("validating")
        self.state["validation"].append([step, loss])
        self.flush(force=True)
        self.inner.on_validation(step, loss)

    def on_samples(self, sheet: SampleSheet) -> None:
        self._phase_done("sampling")
        self.state["samples"].append({"step": sheet.step, "file": sheet.path.name})
        self.flush(force=True)
        self.inner.on_samples(sheet)

    def on_pause(self) -> None:
        self.flush(force=True)  # a reader sees every step done before the pause
        self.inner.on_pause()

    # --- the job's end ----------------------------------------------------------------------
    def conclude(self, diagnosis: Diagnosis | None, best: Checkpoint | None) -> None:
        """The guide's reading of the curve and the checkpoint to use."""
        if diagnosis is not None:
            self.state["diagnosis"] = {"pattern": diagnosis.pattern, "advice": diagnosis.advice,
                                       "evidence": diagnosis.evidence}
        if best is not None:
            self.state["best"] = {"step": best.step, "file": best.path.name}

    def finish(self, status: str, message: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self.state.update(status=status, message=message)
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        if not self.writes or (not force and time.monotonic() - self._written_at < self.interval):
            return
        self.state["updated"] = time.time()
        measured = {step: loss for step, loss in self.state["validation"]}
        lines = [LOSS_HEADER, *(f"{step},{loss:.6f},{lr:.6g},{measured[step]:.6f}" if step in measured else
                                f"{step},{loss:.6f},{lr:.6g}," for step, loss, lr in self.losses)]
        atomic_write_text(loss_log_path(self.run_dir, self.name), "\n".join(lines) + "\n")
        atomic_write_text(journal_path(self.run_dir, self.name), json.dumps(self.state, indent=1))
        self._written_at = time.monotonic()


def read_loss_log(path: Path) -> list[tuple[int, float, float]]:
    """The rows of a loss log; an unreadable row is skipped (the log is for people and charts)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        try:
            step, loss, lr = line.split(",")[:3]
            rows.append((int(step), float(loss), float(lr)))
        except ValueError:
            continue
    return rows


def read_journal(path: Path) -> dict[str, Any] | None:
    """A run's state, or None when the file is missing or not one of ours."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == FORMAT_VERSION else None


def runs_in(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(run folder, journal) of every run in `folder`, by name; a run folder or journal that is a link
    to somewhere else is not one of them."""
    inside = folder.resolve()
    for path in sorted(folder.glob("*/*-run.json")) if folder.is_dir() else []:
        if path.name != f"{path.parent.name}-run.json" or not path.resolve().is_relative_to(inside) or \
                path.parent.resolve().parent != inside:
            continue
        journal = read_journal(path)
        if journal is not None:
            yield path.parent, journal
