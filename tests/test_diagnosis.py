"""The guide's loss-curve diagnosis on curves of known shape (with step-to-step noise, as real
diffusion losses have)."""

from __future__ import annotations

import random

import pytest
from lora_lab.trainer.diagnosis import classify_loss, diagnose_loss


def _curve(shape, steps=400, noise=0.02, seed=0):
    rng = random.Random(seed)
    return [max(1e-4, shape(i / steps) + rng.gauss(0, noise)) for i in range(steps)]


@pytest.mark.parametrize(("shape", "expected"), [
    (lambda x: 0.3 - 0.15 * x, "working"),
    (lambda x: 0.3, "flat"),
    (lambda x: 0.3 - 0.4 * x if x < 0.4 else 0.14 + 0.3 * (x - 0.4), "overfitting"),
    (lambda x: 0.2 + 0.15 * ((int(x * 10) % 2) * 2 - 1), "erratic"),
])
def test_curve_shapes(shape, expected):
    assert classify_loss(_curve(shape)) == expected


def test_spike_and_short_runs():
    curve = _curve(lambda x: 0.2 - 0.1 * x)
    curve[200] = 5.0
    assert classify_loss(curve) == "spikes"
    assert "Too few steps" in diagnose_loss([0.1] * 5)
    assert "increase the learning rate" in diagnose_loss(_curve(lambda x: 0.3))
