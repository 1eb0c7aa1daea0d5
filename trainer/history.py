"""The loss log of a run, `<name>-loss.csv` (step, loss, learning rate), kept in the run folder.

It is rewritten whole through a temporary file and a rename (never appended in place), so a
reader, a crash or a kill always finds a complete file. Rewriting every step would cost a disk
flush per step, so between checkpoints it is written at most once per `interval` seconds; a
checkpoint, a stop and the end of the run always write it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .files import atomic_write_text

HEADER = "step,loss,lr"


class LossLog:
    def __init__(self, path: Path, rows: list[tuple[int, float, float]], interval: float = 1.0) -> None:
        """`rows` is the caller's own list: what it appends is written at the next flush."""
        self.path = path
        self.rows = rows
        self.interval = interval
        self._written_at = 0.0
        self.flush(force=True)  # a resumed run's log holds exactly its steps so far, never a discarded future

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._written_at < self.interval:
            return
        lines = [HEADER, *(f"{step},{loss:.6f},{lr:.6g}" for step, loss, lr in self.rows)]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        self._written_at = time.monotonic()


def read_loss_log(path: Path) -> list[tuple[int, float, float]]:
    """The rows of a loss log (an unreadable row is skipped: the log is for people and charts)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        try:
            step, loss, lr = line.split(",")[:3]
            rows.append((int(step), float(loss), float(lr)))
        except ValueError:
            continue
    return rows
