"""How honest the training panel's time left is: trains the demo (the embedded model and concept
set, samples at every checkpoint, validation on the held-out images) and compares, at step 1, 25 %
and 50 % of the run, the time left the panel shows (trainer/eta.py: steps, saves, validation and
samples) and the steps-only figure it showed before, with the time the run then really took.

    python scripts/measure_eta.py [--steps 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from lora_lab.trainer.cli import DEMO_SETTINGS
from lora_lab.trainer.config import build_config
from lora_lab.trainer.loop import TrainingEvents
from lora_lab.trainer.run import train_lora


class Recorder(TrainingEvents):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float | None, float]] = []  # step, time, eta, seconds per step
        self.speed: float | None = None

    def on_step(self, report) -> None:
        self.speed = report.seconds_per_step if self.speed is None else 0.8 * self.speed + 0.2 * report.seconds_per_step
        self.rows.append((report.step, time.perf_counter(), report.eta_seconds, self.speed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEMO_SETTINGS["steps"])
    args = parser.parse_args()
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as folder:
        settings = {**DEMO_SETTINGS, "steps": args.steps, "save_every": max(1, args.steps // 3),
                    "output_dir": folder, "validation_images": 2}
        train_lora(build_config(settings), recorder)
        ended = time.perf_counter()
    print(f"{'at step':>10} {'really left':>12} {'shown now':>10} {'error':>7} {'steps only':>11} {'error':>7}")
    for share in (0.0, 0.25, 0.5):
        step = max(1, round(share * args.steps))
        _, at, eta, speed = next(row for row in recorder.rows if row[0] == step)
        left, steps_only = ended - at, (args.steps - step) * speed
        print(f"{step:>10} {left:>11.1f}s {eta:>9.1f}s {(eta - left) / left:>+7.0%} {steps_only:>10.1f}s "
              f"{(steps_only - left) / left:>+7.0%}")


if __name__ == "__main__":
    main()
