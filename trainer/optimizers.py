"""The optimizers a run can use, as one table: name → what it is for, how to build it over the
adapter's parameter groups, the state it keeps per trained weight (the memory estimate reads it),
and what it needs (a CUDA GPU, an optional package). The config's choices, the memory estimate and
the loop read this table; a new optimizer is one row here.

Optional ones come from their reference implementations rather than our own maths: Prodigy from
prodigyopt (its authors'), Lion from lion-pytorch (the paper's reference port), AdamW8bit from
bitsandbytes, schedule-free AdamW from schedulefree (its authors', Meta's), Prodigy schedule-free
from prodigy-plus-schedule-free (the one kohya and ai-toolkit users pick); Adafactor is
transformers', a dependency already.

A schedule-free optimizer keeps two sequences of weights: it steps one and evaluates another, so
the loop switches it to `eval()` around validation, samples and saves (the weights saved are the
evaluated ones) and back to `train()` to step (loop.evaluating); it needs no learning-rate
schedule, and warm-up is its own.
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
    schedule_free: bool = False  # train()/eval() modes; no learning-rate schedule (see above)


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


def _adamw_schedulefree(groups: list[dict], settings: Any) -> Any:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(groups, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps)


def _prodigy_schedulefree(groups: list[dict], settings: Any) -> Any:
    from prodigyplus import ProdigyPlusScheduleFree

    return ProdigyPlusScheduleFree(groups, weight_decay=settings.weight_decay)


OPTIMIZERS = {kind.name: kind for kind in (
    Optimizer("adamw", "the usual choice", 8, _adamw),
    Optimizer("adamw8bit", "AdamW with 8-bit state, on a CUDA GPU with bitsandbytes", 2, _adamw8bit, needs_cuda=True,
              package="bitsandbytes"),
    Optimizer("prodigy", "sets its own step size: use learning_rate 1.0", 16, _prodigy, package="prodigyopt"),
    # Factored second moments: a row and a column per matrix, about a byte per weight for LoRA's shapes.
    Optimizer("adafactor", "nearly no optimizer memory, the learning rate as for AdamW", 1, _adafactor),
    Optimizer("lion", "one moment, half AdamW's memory: use a learning rate 3-10 times lower than AdamW's",
              4, _lion, package="lion-pytorch"),
    Optimizer("adamw_schedulefree", "AdamW without a learning-rate schedule: the learning rate as for AdamW, "
              "lr_scheduler constant", 8, _adamw_schedulefree, package="schedulefree", schedule_free=True),
    # Its second moment is factored, and it keeps Prodigy's step-size estimate and start point.
    Optimizer("prodigy_schedulefree", "Prodigy without a schedule: learning_rate 1.0, lr_scheduler constant, no "
              "warm-up", 12, _prodigy_schedulefree, package="prodigy-plus-schedule-free", schedule_free=True),
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


def check_optimizer_settings(settings: Any) -> None:
    """Settings a schedule-free optimizer has no use for are refused, saying why."""
    kind = OPTIMIZERS[settings.optimizer]
    if kind.schedule_free and settings.lr_scheduler != "constant":
        raise LoraLabError(f"lr_scheduler = {settings.lr_scheduler}: {kind.name} is schedule-free (it averages its "
                           "steps instead of decaying the learning rate); set lr_scheduler to constant.")
    if kind.name == "prodigy_schedulefree" and settings.warmup_steps:
        raise LoraLabError(f"warmup_steps = {settings.warmup_steps}: prodigy_schedulefree grows its own step size "
                           "from a tiny start, so it has no warm-up; set warmup_steps to 0.")
