"""Data-parallel training across processes (several GPUs, or machines) through Hugging Face
Accelerate, which runs torch DistributedDataParallel underneath: no distribution code of our own.

Launch the same command once per process, e.g. on one machine with two GPUs:

    torchrun --nproc_per_node 2 -m lora_lab train --config my_run.toml
    accelerate launch --num_processes 2 -m lora_lab train --config my_run.toml

Every process loads the model and encodes the dataset. A step's micro-batches are numbered
globally: process r of W takes numbers base + k·W + r for each of its gradient-accumulation
micro-batches k, and a micro-batch's noise is seeded by its number (see `loop.seed_noise`).
DDP averages the LoRA gradients, so W processes with batch B train exactly as one process with
batch B and gradient accumulation W: the same images, the same noise, the same update
(tests/test_parallel.py compares them). The logged loss and a stop request are agreed by all
processes each step, so a Cancel stops them together. Only the main process writes files: the
run folder, checkpoints, resume files, the journal, validation and samples.

Not yet: training the text encoder with several processes (its LoRA gradients would not be
averaged); it is refused with a message.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LoraLabError


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: world 1, rank 0)."""

    world: int = 1
    rank: int = 0
    accelerator: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device Accelerate assigned to this process (None when training alone)."""
        return self.accelerator.device if self.accelerator is not None else None

    def wrap(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The denoiser as the loop calls it: wrapped by DDP when there are several processes. The
        wrapper answers `.config` like the model, as the families read it."""
        if self.world == 1:
            return denoiser
        wrapped = self.accelerator.prepare_model(denoiser)
        wrapped.config = denoiser.config
        return wrapped

    def accumulating(self, wrapped: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradients of a micro-batch that is not the step's last stay local (one exchange per step)."""
        if self.world == 1 or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(wrapped)

    def mean(self, value: float) -> float:
        """`value` averaged over the processes (the loss every process logs)."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(torch.tensor([value], device=self.device), "mean").item()

    def any(self, flag: bool) -> bool:
        """Whether any process says yes (a stop request seen by one stops all)."""
        if self.world == 1:
            return flag
        return self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum").item() > 0

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


@functools.cache
def processes() -> Processes:
    """This process's place, read from the launcher's environment (torchrun, accelerate launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    return Processes(accelerator.num_processes, accelerator.process_index, accelerator)


def check_parallel_settings(train_text_encoder: bool) -> None:
    if processes().world > 1 and train_text_encoder:
        raise LoraLabError("train_text_encoder is not supported with several training processes yet (its LoRA "
                           "gradients would not be averaged); turn it off, or train in one process.")
