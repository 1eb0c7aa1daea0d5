"""The training loop, the same for every family: draw a batch, noise it, predict, step the
optimizer, report, and save on schedule or when asked to stop.

Out: `TrainingEvents`, what the loop reports (step, checkpoint, samples, ...). In:
`TrainingCommands`, what it is asked: `should_stop()`, polled every step, and `pause_requested()`,
asked before every step: a run that shares its device with other work (a background job in
ComfyUI) parks its own tensors off the device and waits in `pause()`; the RNGs are put back
afterwards, so a paused run trains exactly what an unpaused one would.
Every save hands the caller a `RunState` (weights, optimizer, scheduler, RNGs, position in the
data), and a loop given one continues exactly where it was taken. With several training
processes (parallel.py) each takes its share of a step's micro-batches and DDP averages the
gradients; the main process alone saves and measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import optimizers
from .config import TrainingConfig
from .data import BatchOrder
from .errors import LoraLabError
from .examples import TrainingSet
from .families.base import LoadedModel
from .lora import lora_parameters, named_lora_parameters
from .objectives import noise_batch, weighted_mse
from .parallel import processes
from .precision import autocast_for, resolve_precision
from .resume import RunState, capture_rng, restore_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done so far (1-based)
    total_steps: int
    loss: float
    learning_rate: float
    seconds_per_step: float
    eta_seconds: float | None = None  # the whole run's time left, saves and samples included (trainer/eta.py)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    final: bool


@dataclass(frozen=True)
class SampleSheet:
    step: int
    path: Path  # the saved sheet: one picture per prompt, labelled
    images: list  # the pictures themselves (PIL images), one per prompt


class TrainingEvents:
    """What the loop reports; subclass and override what you need (CLI progress bar, ComfyUI node)."""

    def on_start(self, first_step: int, total_steps: int, checkpoints: list[Checkpoint]) -> None:
        """Once, before the first step: where the run starts (1, or the step after a resumed
        checkpoint) and the checkpoints it already has (those of earlier segments)."""

    def on_step(self, report: StepReport) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def on_phase(self, phase: str) -> None:
        """Work between steps begins: "validating", "sampling" or "saving" (its end is the matching
        on_validation, on_samples or on_checkpoint)."""

    def on_validation(self, step: int, loss: float) -> None:
        pass

    def on_samples(self, sheet: SampleSheet) -> None:
        pass

    def on_pause(self) -> None:
        """The run is about to wait in TrainingCommands.pause() (its tensors are parked)."""


class TrainingCommands:
    """What the loop is asked between steps (the CLI's Ctrl+C, ComfyUI's Cancel, a background job's
    Stop button and its turns on the device). One object may be both events and commands."""

    def should_stop(self) -> bool:
        """Save a checkpoint now and stop."""
        return False

    def pause_requested(self) -> bool:
        return False

    def pause(self) -> None:
        """Called between steps when `pause_requested()`; returns when the run may go on."""


@dataclass
class LoopResult:
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0


def build_optimizer(config: TrainingConfig, model: LoadedModel) -> torch.optim.Optimizer:
    """The configured optimizer (trainer/optimizers.py) over the denoiser's adapter weights and, at
    their own learning rate, the text encoders'."""
    settings = config.optimizer
    denoiser = lora_parameters(model, denoiser_only=True)
    groups = [{"params": denoiser, "lr": settings.learning_rate}]
    in_denoiser = {id(p) for p in denoiser}
    text_parameters = [p for p in lora_parameters(model) if id(p) not in in_denoiser]
    if text_parameters:
        groups.append({"params": text_parameters, "lr": settings.text_encoder_lr or settings.learning_rate / 2})
    return optimizers.build_optimizer(settings.optimizer, groups, settings, torch.cuda.is_available())


def lr_factor(config: TrainingConfig, total_steps: int) -> Callable[[int], float]:
    """Warm-up, then constant, cosine or linear decay, as a multiplier of the learning rate (a
    schedule-free optimizer warms up on its own: 1 throughout)."""
    warmup, kind = config.optimizer.warmup_steps, config.optimizer.lr_scheduler
    if optimizers.OPTIMIZERS[config.optimizer.optimizer].schedule_free:
        return lambda step: 1.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor


OUT_OF_MEMORY_ADVICE = ("Out of memory at step {step}; the last saved checkpoint is kept and the run can be "
                        "resumed. To fit: turn on gradient_checkpointing, lower batch_size (raise "
                        "gradient_accumulation to keep the effective batch), lower resolution or rank, or close "
                        "other programs using the GPU.")


@contextlib.contextmanager
def evaluating(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights a schedule-free optimizer evaluates (trainer/optimizers.py) in the model while the
    block runs (validation, samples, a save), and its training weights back afterwards."""
    modes = hasattr(optimizer, "eval") and hasattr(optimizer, "train")
    if modes:
        optimizer.eval()
    try:
        yield
    finally:
        if modes:
            optimizer.train()


def seed_noise(generator: torch.Generator, seed: int, batch_number: int) -> torch.Generator:
    """A micro-batch's noise and timesteps depend on the run's seed and the micro-batch's number
    alone: a resumed run, or one split over several processes, draws what one process would."""
    return generator.manual_seed(seed * 1_000_003 + batch_number)


@contextlib.contextmanager
def parked(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
           generator: torch.Generator) -> Iterator[None]:
    """Between two steps: the LoRA weights and the optimizer state leave an accelerator (so whatever
    runs meanwhile has all of its memory) and come back bit for bit; every RNG is put back as it
    was, so work done meanwhile cannot change the run's noise."""
    rng = capture_rng(generator)
    tensors = [*parameters, *(value for state in optimizer.state.values() for value in state.values()
                              if isinstance(value, torch.Tensor))]
    moves = [t for t in tensors if t.device.type != "cpu"]
    homes = [t.device for t in moves]
    for tensor in moves:
        tensor.data = tensor.data.to("cpu")
    try:
        yield
    finally:
        for tensor, home in zip(moves, homes, strict=True):
            tensor.data = tensor.data.to(home)
        restore_rng(rng, generator)


def seed_reg_noise(generator: torch.Generator, seed: int, batch_number: int) -> torch.Generator:
    """The noise of the regularisation batch beside micro-batch `batch_number`: its own stream, as
    repeatable as the training batch's (seed_noise)."""
    return generator.manual_seed((seed * 1_000_003 + batch_number) ^ REG_NOISE_STREAM)


REG_NOISE_STREAM = 1 << 62
REG_ORDER_SEED = 7919  # the regularisation order's seed, beside the training order's


def backward_micro_batch(model: LoadedModel, examples: TrainingSet, indices: list[int], number: int,
                         config: TrainingConfig, compute_dtype: torch.dtype, generator: torch.Generator,
                         scaler: torch.amp.GradScaler, prior_loss_weight: float | None = None) -> torch.Tensor:
    """One micro-batch's forward and backward pass; returns its (scaled-down) loss. With a
    `prior_loss_weight`, `examples` is the regularisation set: its batch has its own noise stream
    and its loss counts that much. Its own function so that the batch, the prediction and the graph
    are gone when it returns: a paused run leaves no tensor of its last step on the device."""
    train = config.train
    latents, conditioning, spatial = examples.weighted_batch(indices, compute_dtype, number)
    seeded = (seed_noise if prior_loss_weight is None else seed_reg_noise)(generator, train.seed, number)
    weight = 1.0 if prior_loss_weight is None else prior_loss_weight
    noised = noise_batch(latents.float(), model.noise_scheduler, model.prediction_type, seeded, train.noise_offset,
                         train.min_snr_gamma, model.flow_shift(tuple(latents.shape[-2:]), train.flow_shift))
    with autocast_for(latents.device, compute_dtype):
        prediction = model.family.predict(model, noised.noisy.to(compute_dtype), noised.timesteps, conditioning)
    loss = weight * weighted_mse(prediction, noised.target, noised.weights, spatial) / train.gradient_accumulation
    scaler.scale(loss).backward()
    return loss.detach().float()


NOT_FINITE_ADVICE = ("The loss became {loss} at step {step}; training stopped and the last saved checkpoint is kept. "
                     "Likely causes: learning rate too high (lower it, e.g. halve it), or fp16 overflow (use "
                     "mixed_precision bf16, or a lower learning rate). To go on from the last checkpoint, set resume "
                     "to 'latest' with resume_with_changes on and the new setting.")


@contextlib.contextmanager
def gradient_checkpointing(model: LoadedModel, config: TrainingConfig) -> Iterator[None]:
    """Gradient checkpointing on while the block runs, when the run asks for it."""
    if not config.train.gradient_checkpointing:
        yield
        return
    model.denoiser.enable_gradient_checkpointing()
    if config.lora.train_text_encoder:
        # transformers' encoders offer it; ComfyUI's CLIP (a graph's) does not, and 77 tokens keep little.
        for encoder in model.text_encoders:
            if hasattr(encoder, "gradient_checkpointing_enable"):
                encoder.gradient_checkpointing_enable()
    try:
        yield
    finally:
        model.denoiser.disable_gradient_checkpointing()


class Stepper:
    """Everything one optimizer step needs, built once per run (or restored from a RunState)."""

    def __init__(self, model: LoadedModel, examples: TrainingSet, config: TrainingConfig, total_steps: int,
                 result: LoopResult, regularisation: TrainingSet | None = None) -> None:
        self.model, self.examples, self.config, self.total_steps, self.result = (model, examples, config,
                                                                                 total_steps, result)
        self.regularisation = regularisation
        train = config.train
        self.compute_dtype = resolve_precision(train.mixed_precision, model.device)
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=self.compute_dtype == torch.float16)
        self.group = processes()
        self.denoiser = self.group.wrap(model.denoiser)  # DDP averages the gradients over several processes
        self.trained = model if self.denoiser is model.denoiser else dataclasses.replace(model, denoiser=self.denoiser)
        self.parameters = lora_parameters(model)
        self.optimizer = build_optimizer(config, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, total_steps))
        self.generator = torch.Generator().manual_seed(train.seed)
        self.order = BatchOrder(examples.buckets, examples.repeats, train.batch_size, train.seed)
        # The regularisation images' own endless order: a batch of them beside every training batch,
        # so over the run they are drawn as often as the training images, each as often as the others.
        self.reg_order = (BatchOrder(regularisation.buckets, regularisation.repeats, train.batch_size,
                                     train.seed + REG_ORDER_SEED) if regularisation else None)
        self.first_step, self.batch_number = 1, 0

    def restore(self, state: RunState) -> None:
        self.first_step, self.batch_number = state.step + 1, state.batch_number
        _restore(state, self.model, self.optimizer, self.scheduler, self.scaler, self.generator)
        self.result.losses = [tuple(row) for row in state.losses]

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The model and a schedule-free optimizer in training mode; afterwards the model holds the
        weights saved last (a schedule-free optimizer's evaluated ones)."""
        self.model.denoiser.train()
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()
        try:
            yield
        finally:
            self.model.denoiser.eval()
            if hasattr(self.optimizer, "eval"):
                self.optimizer.eval()

    def step(self, step: int) -> StepReport:
        """One optimizer step: every micro-batch's forward and backward, clipping, the update."""
        train, group, started = self.config.train, self.group, time.perf_counter()
        step_loss = torch.zeros((), device=self.model.device)  # read once per step: no host sync per micro-batch
        for micro in range(train.gradient_accumulation):
            number = self.batch_number + micro * group.world + group.rank  # see parallel.py
            if self.regularisation is not None:  # its own backward, so the step's peak memory stays one batch's
                with group.accumulating(self.denoiser, last=False):
                    step_loss += backward_micro_batch(self.trained, self.regularisation, self.reg_order.batch(number),
                                                      number, self.config, self.compute_dtype, self.generator,
                                                      self.scaler, self.config.data.prior_loss_weight)
            with group.accumulating(self.denoiser, last=micro == train.gradient_accumulation - 1):
                step_loss += backward_micro_batch(self.trained, self.examples, self.order.batch(number), number,
                                                  self.config, self.compute_dtype, self.generator, self.scaler)
        self.batch_number += train.gradient_accumulation * group.world
        loss = group.mean(step_loss.item())
        if not math.isfinite(loss):
            raise LoraLabError(NOT_FINITE_ADVICE.format(loss=loss, step=step))
        if self.config.optimizer.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optimizer.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.result.losses.append((step, loss, learning_rate))
        return StepReport(step, self.total_steps, loss, learning_rate, time.perf_counter() - started)

    def snapshot(self, step: int) -> RunState:
        return RunState(step=step, batch_number=self.batch_number,
                        lora={name: p.detach() for name, p in named_lora_parameters(self.model)},
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        scaler=self.scaler.state_dict(), rng=capture_rng(self.generator),
                        losses=list(self.result.losses),
                        checkpoints=[{"step": c.step, "file": c.path.name, "final": c.final}
                                     for c in self.result.checkpoints])

    def checkpoint(self, step: int, final: bool, save: Callable[[int, bool, RunState], Path]) -> Checkpoint:
        with evaluating(self.optimizer):
            path = save(step, final, self.snapshot(step)) if self.group.main else None
        self.group.wait()
        checkpoint = Checkpoint(step, path or Path(), final)
        self.result.checkpoints.append(checkpoint)
        return checkpoint


def run_loop(model: LoadedModel, examples: TrainingSet, config: TrainingConfig, total_steps: int,
             save_every: int, save: Callable[[int, bool, RunState], Path], events: TrainingEvents,
             commands: TrainingCommands | None = None, resume: RunState | None = None,
             watch: Callable[[int, bool], None] | None = None, earlier: list[Checkpoint] | None = None,
             regularisation: TrainingSet | None = None) -> LoopResult:
    """Train up to `total_steps` optimizer steps, from the start or from `resume`, after the `earlier`
    checkpoints (those of a resumed run's segments, or a run's step 0 from a file), reporting to
    `events` and asked by `commands`; `save(step, final, state)` writes a checkpoint and returns
    the LoRA file's path; `watch(step, checkpoint_due)` measures between steps (validation,
    samples) without training; `regularisation` is the set of class images trained beside `examples`."""
    commands = commands or TrainingCommands()
    with gradient_checkpointing(model, config):  # on before the denoiser is wrapped for several processes
        run = Stepper(model, examples, config, total_steps, LoopResult(checkpoints=list(earlier or [])),
                      regularisation)
        if resume is not None:
            run.restore(resume)
        result = run.result
        events.on_start(run.first_step, total_steps, list(result.checkpoints))
        started, step, out_of_memory = time.perf_counter(), run.first_step - 1, False
        with run.training():
            try:
                for step in range(run.first_step, total_steps + 1):
                    if commands.pause_requested():
                        with parked(run.parameters, run.optimizer, run.generator):
                            events.on_pause()
                            commands.pause()
                    events.on_step(run.step(step))
                    stop = run.group.any(commands.should_stop())  # every process stops at the same step
                    final = step == total_steps
                    checkpoint_due = final or stop or step % save_every == 0
                    if watch and not stop and run.group.main:  # a Cancel saves at once, without measuring first
                        with evaluating(run.optimizer):
                            watch(step, checkpoint_due)
                    if checkpoint_due:
                        events.on_checkpoint(run.checkpoint(step, final, save))
                    if stop and not final:
                        result.stopped = True
                        log.info("Stopped at step %d of %d; checkpoint saved.", step, total_steps)
                        break
            except torch.OutOfMemoryError:
                out_of_memory = True  # raised below, outside this block: see there
    if out_of_memory:
        # The out-of-memory error's traceback holds the failed step's activations; raised from
        # here, the advice carries no reference to it, so the memory is free for whatever runs next
        # (ComfyUI keeps the error it shows).
        run.optimizer.zero_grad(set_to_none=True)
        raise LoraLabError(OUT_OF_MEMORY_ADVICE.format(step=step))
    result.seconds = time.perf_counter() - started
    return result


def _restore(state: RunState, model: LoadedModel, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
             generator: torch.Generator) -> None:
    """Put a saved state back: weights, optimizer, schedule, grad scaler and every RNG."""
    parameters = dict(named_lora_parameters(model))
    if set(parameters) != set(state.lora):
        raise LoraLabError("The resume file's LoRA layers differ from this model's (another base model, rank or "
                           "targets); resume from a checkpoint of this run, or start a new run.")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != state.lora[name].shape:
                raise LoraLabError(f"The resume file's layer {name} has shape {tuple(state.lora[name].shape)}, "
                                   f"the model's {tuple(parameter.shape)}; resume with the same rank and model.")
            parameter.copy_(state.lora[name])
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    restore_rng(state.rng, generator)
