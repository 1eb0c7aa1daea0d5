"""The training panel's time left (trainer/eta.py) counts the work between steps on its schedule, and
says what the settings left at 0 become before Queue (trainer/explain.py)."""

from __future__ import annotations

import pytest
from lora_lab.trainer.eta import RunClock, Schedule, sample_passes
from lora_lab.trainer.explain import plan_line, rate


@pytest.mark.parametrize("every", [0, 7, 25, 50, 60])
def test_the_schedule_counts_every_save_validation_and_sample_sheet(every):
    plan = Schedule(total_steps=250, save_every=50, validation_every=every, sample_every=every)
    for first in (1, 49, 50, 51, 200, 250):
        due = [step for step in range(first, 251) if step % 50 == 0 or step == 250 or (every and step % every == 0)]
        assert plan.count(every, first) == len(due), (every, first)


def test_the_time_left_holds_the_work_still_to_come():
    plan = Schedule(total_steps=100, save_every=25, validation_every=10, sample_every=0, validation_batches=2,
                    sample_passes=sample_passes(2, 20, True, 4))
    clock = RunClock(plan)
    assert clock.remaining(1) is None  # nothing timed yet
    clock.step_done(3.0)  # the first step warms up
    clock.step_done(1.0)
    assert clock.step_seconds == 1.0
    steps_only = 98 * 1.0
    left = clock.remaining(2)
    # 4 checkpoints with samples and validation, 8 more validations (every 10 steps), all estimated from
    # the step time: a validation is 2 batches of forward passes, a sample sheet 20 steps x 2 prompts x 2
    # (guidance) at batch 4.
    assert left == pytest.approx(steps_only + 4 * 0.5 + 12 * 0.35 * 2 + 4 * 0.35 * 20)
    clock.work_done("sampling", 2.0)
    assert clock.remaining(2) == pytest.approx(steps_only + 4 * 0.5 + 12 * 0.35 * 2 + 4 * 2.0)
    assert clock.remaining(100) == pytest.approx(0.5 + 0.7 + 2.0)  # the last step's save, validation and samples


def test_the_plan_line_says_what_each_zero_becomes():
    line = plan_line({"preset": "character"}, "sd15", 22)
    assert line.startswith("rank 32 and learning rate 1e-4 from the character preset")
    assert "2,000 steps = 100 x 20 images" in line and "alpha 32 (= rank)" in line and "512 px (SD 1.5's own)" in line
    assert "a checkpoint every 500 steps (4 in all)" in line and "2 of 22 images held out" in line
    explicit = plan_line({"preset": "style", "rank": 8, "learning_rate": 2e-4, "steps": 300, "resolution": 768,
                          "save_every": 100, "validation_images": -1}, "sdxl", 12)
    assert not explicit.startswith("rank") and "768 px;" in explicit and "every 100 steps;" in explicit
    assert "no validation images" in explicit
    unknown = plan_line({"preset": "likeness"}, "", None)
    assert "learning rate 5e-5" in unknown and "run the dataset to see the number" in unknown
    assert "held out" not in unknown and "1024 px for SDXL" in unknown
    assert "leaves no image to train on" in plan_line({"validation_images": 5}, "sd15", 5)
    started = plan_line({"preset": "character", "init_lora": "styles/core_trained.safetensors"}, "sd15", 22)
    assert started.startswith("type, rank, alpha and layers from core_trained.safetensors, whose weights train on "
                              "with a new optimizer state (not an exact resume); learning rate 1e-4 from the "
                              "character preset")
    assert "rank 32" not in started and "alpha" not in started.split(";", 2)[-1]
    assert plan_line({"init_lora": "None"}, "sd15", 22).startswith("rank 32")
    assert [rate(value) for value in (1e-4, 5e-5, 2.5e-4, 1.0)] == ["1e-4", "5e-5", "2.5e-4", "1"]
