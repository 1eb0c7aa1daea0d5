"""The guide's loss-curve diagnosis on curves of known shape carrying the noise real diffusion loss
has: every step's value is its curve's trend times a ratio drawn from a real run's per-step loss
divided by its local mean (tests/fixtures/diffusion_loss_ratios.json; coefficient of variation
0.76), sharpened or softened to a coefficient of variation of 0.6, 0.8 or 1.0 per curve, as real
runs show in any 50-step window.

Accuracy per pattern is printed. A falling curve must never be told to lower the learning rate.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
from lora_lab.trainer.diagnosis import diagnose, diagnose_loss

RATIOS = json.loads((Path(__file__).parent / "fixtures" / "diffusion_loss_ratios.json").read_text())["ratios"]
CURVES_PER_PATTERN = 20


def noisy(trend, steps: int, rng: random.Random, cv: float) -> list[float]:
    """trend(x) for x in [0, 1) times real per-step noise, its spread scaled to coefficient of
    variation `cv` (the shape of its distribution, long low tail and short high one, kept)."""
    scale = cv / statistics.stdev(RATIOS)
    return [trend(i / steps) * max(0.02, 1 + (rng.choice(RATIOS) - 1) * scale) for i in range(steps)]


def falling(rng):
    start, end, rate = rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.7), rng.uniform(3, 8)
    return lambda x: start * (end + (1 - end) * math.exp(-rate * x))


def flat(rng):
    level, drift = rng.uniform(0.05, 0.3), rng.uniform(-0.01, 0.01)
    return lambda x: level * (1 + drift * x)


def dropping_then_rising(rng):
    level, bottom, turn, rise = rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.5), \
        rng.uniform(0.5, 0.9)
    return lambda x: level * (1 - (1 - bottom) * x / turn if x < turn else bottom + rise * bottom * (x - turn)
                              / (1 - turn))


def oscillating(rng):
    """A learning rate too high: the loss swings between good and bad stretches, a few times a run."""
    base, amplitude, period = falling(rng), rng.uniform(0.5, 0.8), rng.uniform(0.08, 0.2)
    return lambda x: base(x) * (1 + amplitude * math.sin(2 * math.pi * x / period))


PATTERNS = {"working": falling, "flat": flat, "overfitting": dropping_then_rising, "erratic": oscillating}


def curves(pattern: str):
    for seed in range(CURVES_PER_PATTERN):
        rng = random.Random(f"{pattern}{seed}")
        steps, cv = rng.choice([300, 600, 1500, 3000]), rng.choice([0.6, 0.8, 1.0])
        yield noisy(PATTERNS[pattern](rng), steps, rng, cv)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_each_pattern_is_read_right_under_real_noise(pattern):
    readings = Counter(diagnose(curve).pattern for curve in curves(pattern))
    accuracy = readings[pattern] / CURVES_PER_PATTERN
    print(f"{pattern}: {accuracy:.0%} right ({dict(readings)})")
    assert accuracy >= 0.9


def test_a_falling_noisy_curve_is_never_told_to_lower_the_learning_rate():
    for pattern in ("working", "flat"):
        readings = Counter(diagnose(curve).pattern for curve in curves(pattern))
        assert readings["erratic"] == 0 and readings["spikes"] == 0, (pattern, readings)


def test_spikes_are_found_where_they_are():
    found = 0
    for seed in range(CURVES_PER_PATTERN):
        rng = random.Random(f"spike{seed}")
        curve = noisy(falling(rng), 600, rng, rng.choice([0.6, 0.8, 1.0]))
        where = rng.randrange(100, 500)
        curve[where] *= rng.uniform(20, 40)
        reading = diagnose(curve)
        found += reading.pattern == "spikes" and str(where + 1) in reading.evidence
    print(f"spikes: {found / CURVES_PER_PATTERN:.0%} right")
    assert found >= 0.9 * CURVES_PER_PATTERN


def test_validation_loss_decides_overfitting_while_training_loss_still_falls():
    rng = random.Random(3)
    training = noisy(falling(rng), 600, rng, 0.8)  # training loss keeps falling: memorising
    rising = [(step, 0.12 - 0.04 * min(step, 250) / 250 + 0.03 * max(0, step - 250) / 350)
              for step in range(30, 601, 30)]
    reading = diagnose(training, rising)
    assert reading.pattern == "overfitting" and reading.lowest_step == 240 and "validation" in reading.evidence
    steady = [(step, 0.12 - 0.05 * step / 600) for step in range(30, 601, 30)]
    assert diagnose(training, steady).pattern == "working"
    # A spike in the training loss does not hide what the held-out images say (a real overfit run
    # at a high learning rate has both); without the validation rise, the spike is what is shown.
    training[300] *= 30
    spiked = diagnose(training, rising)
    assert spiked.pattern == "overfitting" and "spiked at step 301" in spiked.evidence
    assert diagnose(training, steady).pattern == "spikes"


def test_short_runs_and_the_advice_text():
    assert "Too few steps" in diagnose_loss([0.1] * 5)
    assert "increase the learning rate" in diagnose_loss(noisy(flat(random.Random(1)), 400, random.Random(2), 0.8))
    assert "reduce it" in diagnose_loss(noisy(oscillating(random.Random(4)), 600, random.Random(5), 0.8))


def test_a_run_stopped_early_is_not_called_flat():
    """61 steps of 250 after a Cancel: too early to say the learning is too slow."""
    from lora_lab.trainer.diagnosis import diagnose

    flat = [0.05 if step % 2 else 0.15 for step in range(61)]  # noisy, and no fall at all
    assert diagnose(flat).pattern == "flat"
    early = diagnose(flat, planned=250)
    assert early.pattern == "too_short" and "61 of 250 steps" in early.evidence
    assert diagnose(flat, planned=61).pattern == "flat"  # the run's end: judged
