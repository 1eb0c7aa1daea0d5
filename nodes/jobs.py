"""Background training jobs: Train LoRA with `background` on starts its run here and returns at once,
so the queue moves on (sampling, stacking, other workflows) while the run trains. A job belongs to
the server process, outlives the prompt that started it, and is listed and stopped through routes
(nodes/routes.py) and the training panel.

How a job shares the device with the prompts the queue runs (the design):

- Turns. The device is used in turns (`DeviceTurns`): every prompt's execution takes a turn
  (comfy_bridge.run_prompts_in_turns wraps ComfyUI's executor), and a job trains only in its own.
  Before every step a job asks whether a prompt is waiting; if one is, it parks its LoRA weights and
  optimizer state off the accelerator (trainer/loop.py `parked`), hands the turn over and waits until
  no prompt runs or waits. A prompt waits at most one training step (or one validation or sample
  pass) to start, and then has the device as if no job existed: whatever ComfyUI's model management
  does meanwhile (move, patch, offload or free the base weights, load other models) happens while
  the job is parked, never in the middle of a step.
  The job's denoiser also lets go of the base weights it shares with ComfyUI's model
  (`release_base_weights`): ComfyUI patches a LoRA in by *replacing* weight tensors, so a
  denoiser still holding the old ones would keep a second copy alive on the device.
- Back to training. The job takes its turn back, has ComfyUI load its base model whole again (which
  unloads what the prompts left on the device, as at the start of a run, and un-patches it), links
  its denoiser to the base weights as they now are (`relink_base_weights`, through the same
  conversion that built it, which also turns tensors moved under inference mode back into normal
  ones), and the loop puts every RNG back as it was. The base values are the same and no state of
  the run changed, so a paused run's LoRA is bit-identical to an unpaused one's
  (tests/test_jobs.py; the real-server test on CPU).
- Memory. The job keeps no second copy of the base: it trains on the graph's own tensors, as a
  foreground run does. In its turn it needs what a foreground run needs (the preflight estimate
  checks that when it starts); in a prompt's turn it holds nothing on the device. So a prompt never
  has to fit *beside* the job: it runs alone, and the job waits. The cost is time, not memory: the
  job stands still while prompts run, and a prompt starts up to one step late.
- One job at a time: a second, different background training while one runs is refused with a
  message naming the running job; the same training queued again joins it (no second run).
- Stop (the panel's button, or POST /lora_lab/jobs/stop) saves a resumable checkpoint, exactly as
  Cancel does in the foreground. The queue's Cancel stops prompts, never a background job.
- Server restart: the run's journal names the server session that ran it; a run still "training"
  under another session was interrupted, and is listed as stopped with its last checkpoint
  (`interrupted_message`), so resume = latest continues it.

Nothing here imports ComfyUI: the node passes in what reaches it (comfy_bridge), so the job
machinery is tested without a server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..trainer.errors import LoraLabError
from ..trainer.loop import Checkpoint, StepReport, TrainingCommands
from ..trainer.run import TrainingResult, finish_message, stop_message
from .panel_events import PanelEvents
from .values import TrainingRun

log = logging.getLogger(__name__)

# This server process; a run's journal records it (owner["server"]) to tell an interrupted run
# from one still training.
SERVER_SESSION = uuid.uuid4().hex
ACTIVE = ("starting", "training", "paused", "stopping")


class DeviceTurns:
    """Prompts and the background job use the device in turns. A prompt's turn starts as soon as
    the job is between steps, and the job waits while any prompt runs or waits."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._prompts = 0  # prompts running or waiting for their turn
        self._job_busy = False
        self.installed = False  # set once the server's prompts take turns (comfy_bridge.run_prompts_in_turns)

    @contextlib.contextmanager
    def prompt_turn(self) -> Iterator[None]:
        with self._condition:
            self._prompts += 1
            self._condition.wait_for(lambda: not self._job_busy)
        try:
            yield
        finally:
            with self._condition:
                self._prompts -= 1
                self._condition.notify_all()

    def prompt_waiting(self) -> bool:
        return self._prompts > 0

    def take_job_turn(self) -> None:
        """Wait until no prompt runs or waits (one job at a time takes turns)."""
        with self._condition:
            self._condition.wait_for(lambda: self._prompts == 0)
            self._job_busy = True

    def release_job_turn(self) -> None:
        with self._condition:
            self._job_busy = False
            self._condition.notify_all()


TURNS = DeviceTurns()


def release_base_weights(denoiser: torch.nn.Module) -> int:
    """Before a pause: the job's denoiser lets go of the frozen base weights it shares with ComfyUI's
    model (kept as shapes on the meta device), so during a prompt's turn they are ComfyUI's alone to
    move, patch or free; its own copies (a starting file's weight differences, trainer/init_lora.py)
    stay. Returns how many were released."""
    released = 0
    for module in denoiser.modules():
        for name, parameter in list(module._parameters.items()):
            if (parameter is not None and not parameter.requires_grad and parameter.device.type != "meta"
                    and not getattr(parameter, "lora_lab_own", False)):  # a copy of the job's own: kept
                module._parameters[name] = torch.nn.Parameter(parameter.detach().to("meta"), requires_grad=False)
                released += 1
    return released


def relink_base_weights(denoiser: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """After a pause: the denoiser's base weights become `fresh`'s (the same architecture, freshly
    converted from ComfyUI's model as it is now: a prompt may have replaced tensors while patching
    a LoRA in and out, or moved them under inference mode). The LoRA layers (PEFT's `base_layer`
    wrappers) are kept."""
    current = fresh.state_dict(keep_vars=True)
    for module_name, module in denoiser.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or parameter.requires_grad or getattr(parameter, "lora_lab_own", False):
                continue
            key = f"{module_name}.{name}".replace(".base_layer.", ".").lstrip(".")
            if key not in current or current[key].shape != parameter.shape:
                raise LoraLabError(f"After a pause the base model no longer has {key} as it was; the background run "
                                   "stops here (its last checkpoint is kept). Do not change the model it trains.")
            module._parameters[name] = current[key]


@dataclass
class TrainingJob:
    """One background run: its state as the routes list it, and its stop switch."""

    name: str  # the run's name (its folder under the LoRA Lab folder)
    key: str  # what identifies "the same training" (settings, dataset, model)
    settings_key: str  # the node's settings alone (all a fingerprint sees)
    node: str | None  # the Train LoRA node that started it (the panel's run)
    total_steps: int
    trigger_words: tuple[str, ...] = ()
    status: str = "starting"  # starting, training, paused, stopping, finished, stopped, failed
    message: str = ""
    step: int = 0
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    validation: dict[int, float] = field(default_factory=dict)
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    result: TrainingResult | None = None
    started: float = field(default_factory=time.time)
    paused_seconds: float = 0.0
    stop_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def best_step(self) -> int | None:
        """The recommended checkpoint so far: the finished run's, else the lowest validation loss
        among the saved checkpoints, else the newest."""
        if self.result is not None and self.result.best is not None:
            return self.result.best.step
        scored = [(self.validation[step], -step) for step, _ in self.checkpoints if step in self.validation]
        if scored:
            return -min(scored)[1]
        return self.checkpoints[-1][0] if self.checkpoints else None

    def token(self) -> str:
        """Changes whenever a checkpoint lands or the job ends: what makes ComfyUI run the nodes
        that use the job again (Train LoRA's fingerprint)."""
        return f"{self.name}:{len(self.checkpoints)}:{'active' if self.active else self.status}"

    def stop(self) -> None:
        if self.active:
            self.stop_requested.set()
            self.status, self.message = "stopping", "Stopping: saving a checkpoint at the end of this step ..."

    def listing(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "status": self.status, "message": self.message,
                "step": self.step, "total_steps": self.total_steps, "started": self.started,
                "paused_seconds": round(self.paused_seconds, 1),
                "checkpoints": [{"step": step, "file": path.name} for step, path in self.checkpoints],
                "best_step": self.best_step}


class JobEvents(PanelEvents, TrainingCommands):
    """The loop's events for a background job: the panel's events, the job's state, the stop
    switch, and turns with the prompts."""

    def __init__(self, job: TrainingJob, send: Callable[[str, dict], None], turns: DeviceTurns,
                 trainer: Trainer) -> None:
        super().__init__(job.node, job.name, send)
        self.job, self.turns, self.trainer = job, turns, trainer

    def status(self, status: str, message: str = "", **extra: Any) -> None:
        self.job.status, self.job.message = status, message
        super().status(status, message, background=True, **extra)

    def on_start(self, first_step: int, total_steps: int, checkpoints: list[Checkpoint]) -> None:
        # A resumed run: the checkpoints of its earlier segments are the run's too.
        self.job.checkpoints = [(checkpoint.step, checkpoint.path) for checkpoint in checkpoints]
        self.job.step, self.job.total_steps = first_step - 1, total_steps
        super().on_start(first_step, total_steps, checkpoints)

    def on_step(self, report: StepReport) -> None:
        self.job.step, self.job.total_steps = report.step, report.total_steps
        self.job.losses.append((report.step, report.loss, report.learning_rate))
        super().on_step(report)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.job.checkpoints.append((checkpoint.step, checkpoint.path))
        super().on_checkpoint(checkpoint)

    def on_validation(self, step: int, loss: float) -> None:
        self.job.validation[step] = loss
        super().on_validation(step, loss)

    def should_stop(self) -> bool:
        return self.job.stop_requested.is_set()

    def pause_requested(self) -> bool:
        return self.turns.prompt_waiting() and not self.job.stop_requested.is_set()

    def pause(self) -> None:
        """Hand the device to the waiting prompts; come back when none runs or waits."""
        paused = time.monotonic()
        self.status("paused", "Paused while a prompt runs; training goes on when the queue is idle.")
        self.trainer.leave_device()
        self.turns.release_job_turn()
        try:
            self.turns.take_job_turn()
        finally:
            self.job.paused_seconds += time.monotonic() - paused
        self.trainer.back_to_training()
        if self.job.status == "paused":
            self.status("training")


@dataclass(frozen=True)
class Trainer:
    """A job's work: `train(events)` runs the whole training (in the job's thread, in its turns);
    `leave_device()` lets go of what the prompts may change before a pause, `back_to_training()`
    takes it back after."""

    train: Callable[[JobEvents], TrainingResult]
    leave_device: Callable[[], None] = lambda: None
    back_to_training: Callable[[], None] = lambda: None


class JobRegistry:
    """The server's background jobs, newest last; at most one active."""

    def __init__(self, turns: DeviceTurns = TURNS) -> None:
        self.turns = turns
        self.jobs: list[TrainingJob] = []
        self._lock = threading.Lock()

    def active(self) -> TrainingJob | None:
        return next((job for job in self.jobs if job.active), None)

    def find(self, key: str) -> TrainingJob | None:
        return next((job for job in reversed(self.jobs) if job.key == key), None)

    def find_settings(self, settings_key: str) -> TrainingJob | None:
        return next((job for job in reversed(self.jobs) if job.settings_key == settings_key), None)

    def named(self, name: str) -> TrainingJob | None:
        return next((job for job in reversed(self.jobs) if job.name == name), None)

    def start(self, job: TrainingJob, trainer: Trainer, send: Callable[[str, dict], None]) -> TrainingJob:
        """Run the trainer in a thread of its own, in turns with the prompts; or, when the same
        training (the same key) is active or finished, return that job. A different training while
        one is active is refused."""
        with self._lock:
            same = self.find(job.key)
            if same is not None and (same.active or same.status == "finished"):
                return same
            running = self.active()
            if running is not None:
                raise LoraLabError(f"Background training {running.name!r} is running (step {running.step} of "
                                   f"{running.total_steps}); one background run trains at a time. Stop it on its "
                                   "Train LoRA panel, or wait until it finishes, then queue this one.")
            events = JobEvents(job, send, self.turns, trainer)
            job.thread = threading.Thread(target=self._run, args=(job, events, trainer.train), daemon=True,
                                          name=f"lora-lab-{job.name}")
            # One entry per run: a resumed run's job replaces the one that stopped.
            self.jobs = [other for other in self.jobs if other.name != job.name] + [job]
            job.thread.start()
            return job

    def _run(self, job: TrainingJob, events: JobEvents, train: Callable[[JobEvents], TrainingResult]) -> None:
        self.turns.take_job_turn()  # the prompt that started the job finishes first
        try:
            events.status("training", "Loading the model and encoding the dataset ...")
            job.result = train(events)
            job.step = job.result.checkpoints[-1].step if job.result.checkpoints else job.step
            if job.result.stopped:
                events.status("stopped", stop_message(job.result))
            else:
                events.status("finished", finish_message(job.result))
        except LoraLabError as error:
            events.status("failed", str(error))
        except Exception as error:  # a background thread has nobody to raise to: say it, and log it
            log.exception("Background training %s failed", job.name)
            events.status("failed", f"Training stopped by an unexpected error ({type(error).__name__}: {error}); "
                          "see the server log. The last saved checkpoint is kept.")
        finally:
            if job.result is not None:
                job.result.model = None  # the adapter and optimizer go now
            self.turns.release_job_turn()
            job.done.set()

    def stop(self, name: str) -> TrainingJob | None:
        job = self.named(name)
        if job is not None and job.active:
            job.stop()
            return job
        return None

    def listing(self) -> list[dict[str, Any]]:
        return [job.listing() for job in self.jobs]


JOBS = JobRegistry()


def job_run(job: TrainingJob) -> TrainingRun:
    """The RUN value of a job: the checkpoints saved so far and the recommended one."""
    return TrainingRun(job.name, tuple(job.checkpoints), job.trigger_words, job.status == "stopped",
                       job.best_step, training=job.active)


def interrupted_message(journal: dict[str, Any]) -> str | None:
    """For a run whose journal still says "training" although the server that ran it is gone (a
    restart or a crash): what the user should know and do. None for a live or ended run."""
    owner = journal.get("owner") or {}
    if journal.get("status") != "training" or "server" not in owner or owner["server"] == SERVER_SESSION:
        return None
    saved = journal.get("checkpoints") or []
    if not saved:
        return (f"Interrupted at step {journal.get('step', 0)} (the server stopped) before its first checkpoint; "
                "queue Train LoRA again to start it anew.")
    last = saved[-1]
    return (f"Interrupted at step {journal.get('step', 0)} when the server stopped; the last checkpoint is "
            f"{last.get('file')} (step {last.get('step')}). Set resume to 'latest' and queue Train LoRA again "
            "to continue from there.")
