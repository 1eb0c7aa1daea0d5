"""The optimizers a run can use, as one table: name → what it is for, how to build it over the
adapter's parameter groups, the state it keeps per trained weight (the memory estimate reads it),
and what it needs (a CUDA GPU, an optional package). The config's choices, the memory estimate and
the loop read this table; a new optimizer is one row here.

Optional ones come from their reference implementations rather than our own maths: Prodigy from
prodigyopt (its authors'), Lion from lion-pytorch (the paper's reference port), AdamW8bit from
bitsandbytes; Adafactor is transformers', a dependency already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import LoraLabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimizer:
    name: str
    help: str
    state_bytes: int  # optimizer state per trained fp32 weight, in bytes
    build: Callable[[list[dict], Any], Any]  # (parameter groups, OptimizerSettings) -> torch optimizer
    needs_cuda: bool = False
    package: str = ""  # the pip package it comes from, when optional


def _adamw(groups: list[dict], settings: Any) -> Any:
    import torch

    # The fused kernel updates every adapter weight in one pass (CPU and CUDA alike).
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay, fused=True)


def _prodigy(groups: list[dict], settings: Any) -> Any:
    from prodigyopt import Prodigy

    if settings.learning_rate < 0.1:
        log.warning("Prodigy adapts its own step size; learning_rate is a multiplier and 1.0 is usual (got %g).",
                    settings.learning_rate)
    return Prodigy(groups, weight_decay=settings.weight_decay, safeguard_warmup=True, use_bias_correction=True)


def _adamw8bit(groups: list[dict], settings: Any) -> Any:
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, weight_decay=settings.weight_decay)


def _adafactor(groups: list[dict], settings: Any) -> Any:
    from transformers.optimization import Adafactor

    # kohya's LoRA recipe: the learning rate as given (no relative step or parameter scaling).
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=settings.weight_decay)


def _lion(groups: list[dict], settings: Any) -> Any:
    from lion_pytorch import Lion

    return Lion(groups, weight_decay=settings.weight_decay)


OPTIMIZERS = {kind.name: kind for kind in (
    Optimizer("adamw", "the usual choice", 8, _adamw),
    Optimizer("adamw8bit", "AdamW with 8-bit state, on a CUDA GPU with bitsandbytes", 2, _adamw8bit, needs_cuda=True,
              package="bitsandbytes"),
    Optimizer("prodigy", "sets its own step size: use learning_rate 1.0", 16, _prodigy, package="prodigyopt"),
    # Factored second moments: a row and a column per matrix, about a byte per weight for LoRA's shapes.
    Optimizer("adafactor", "nearly no optimizer memory, the learning rate as for AdamW", 1, _adafactor),
    Optimizer("lion", "one moment, half AdamW's memory: use a learning rate 3-10 times lower than AdamW's",
              4, _lion, package="lion-pytorch"),
)}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def optimizer_help() -> str:
    return "Optimizer: " + "; ".join(f"{kind.name} ({kind.help})" for kind in OPTIMIZERS.values()) + "."


def build_optimizer(name: str, groups: list[dict], settings: Any, cuda_available: bool) -> Any:
    """The optimizer `name` over `groups`, or a message saying what it needs."""
    kind = OPTIMIZERS[name]
    if kind.needs_cuda and not cuda_available:
        raise LoraLabError(f"optimizer = {name} runs only on a CUDA GPU; use adamw on this machine.")
    try:
        return kind.build(groups, settings)
    except ImportError:
        raise LoraLabError(f"optimizer = {name} needs the {kind.package} package: pip install {kind.package} "
                           "(or use adamw).") from None
