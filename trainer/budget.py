"""Will the run fit? Peak memory and disk space, estimated before the first step and compared with
what the device and the output folder have free.

A step's memory is measured, not guessed: a copy of the denoiser built on PyTorch's meta device
(no memory, no arithmetic) runs one forward and backward pass at the real batch shape, and the
bytes of every tensor alive are counted at their peak. Attention is counted as the
memory-efficient kernels used in training keep it (query, key, value, output and a log-sum-exp),
not as the full score matrix the meta device's fallback would keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .config import TrainingConfig, build_config
from .errors import LoraLabError
from .examples import TrainingSet
from .families.base import Encoders, LoadedModel
from .fp8 import Float8Linear, float8_bytes_saved
from .lora import add_lora, lora_parameters
from .optimizers import OPTIMIZERS

log = logging.getLogger(__name__)

GIB = 2**30
CUDA_OVERHEAD = 600 * 2**20  # CUDA context, cuBLAS workspace and allocator slack


@dataclass(frozen=True)
class MemoryEstimate:
    base: int  # frozen model weights held on the device
    adapters: int  # LoRA weights (fp32)
    optimizer: int
    step: int  # a step's peak: activations kept for the backward pass, gradients, backward temporaries
    overhead: int

    @property
    def training(self) -> int:
        """What training adds on top of the loaded model."""
        return self.adapters + self.optimizer + self.step + self.overhead

    @property
    def total(self) -> int:
        return self.base + self.training

    def describe(self) -> str:
        parts = [("base model", self.base), ("LoRA", self.adapters), ("optimizer", self.optimizer),
                 ("one step", self.step)] + ([("runtime", self.overhead)] if self.overhead else [])
        return " + ".join(f"{name} {size / GIB:.2f}" for name, size in parts) + f" = {self.total / GIB:.2f} GiB"


def _size(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _EfficientAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device: the output shape, and the
    tensors flash / memory-efficient attention save for backward."""

    @staticmethod
    def forward(ctx, query, key, value):  # type: ignore[override]
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextlib.contextmanager
def _efficient_attention() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        return _EfficientAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measure_step(model: LoadedModel, config: TrainingConfig, latents: torch.Tensor,
                 conditioning: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> int:
    """The peak bytes one training step adds to the weights, measured on a meta-device copy: a
    forward and a backward pass at the real batch shape (with gradient checkpointing when it is
    on), every tensor counted while it is alive (`LiveTensorBytes`): what autograd keeps, the
    LoRA gradients, and the backward pass's temporaries. scripts/benchmark_trainer.py counts the
    same on a real step: within a few percent on the CPU."""
    with torch.device("meta"):
        denoiser = type(model.denoiser).from_config(model.denoiser.config)
    # torch's own .to: diffusers' warns about fp32-kept modules on every call (a list that is empty here).
    torch.nn.Module.to(denoiser, compute_dtype)
    probe = dataclasses.replace(model, denoiser=denoiser, encoders=Encoders())
    add_lora(probe, config.lora.rank, config.alpha, config.lora.targets, False, config.lora.adapter,
             **config.lora.adapter_options())
    denoiser.train()
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    batch = config.train.batch_size
    meta = {key: torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta")
            for key, value in conditioning.items()}
    noisy = torch.empty((batch, *latents.shape[1:]), dtype=compute_dtype, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    counter = LiveTensorBytes()
    with _efficient_attention(), counter:
        prediction = model.family.predict(probe, noisy, timesteps, meta)
        target = torch.empty(prediction.shape, dtype=torch.float32, device="meta")
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
    # fp8 weights (fp8_base, or a ComfyUI model loaded in fp8) are dequantized for each product
    # (fp8.py): two copies of the largest linear weight in the compute dtype at most, beside the
    # step's other tensors.
    if not (config.train.fp8_base or any(isinstance(m, Float8Linear) for m in model.denoiser.modules())):
        return counter.peak
    largest = max((m.weight.numel() for m in denoiser.modules() if isinstance(m, torch.nn.Linear)), default=0)
    return counter.peak + 2 * largest * torch.empty((), dtype=compute_dtype).element_size()


def estimate_memory(model: LoadedModel, examples: TrainingSet, config: TrainingConfig,
                    compute_dtype: torch.dtype) -> MemoryEstimate:
    largest = max(range(len(examples.examples)), key=lambda i: math.prod(examples.examples[i].bucket))
    with torch.no_grad():
        latents, conditioning = examples.batch([largest], compute_dtype)
    modules = [model.denoiser, *model.encoders.modules()]
    on_device = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device == model.device]
    lora = lora_parameters(model)
    lora_bytes = _size(lora)
    return MemoryEstimate(
        base=_size(on_device) - lora_bytes,
        adapters=lora_bytes,
        optimizer=sum(p.numel() for p in lora) * OPTIMIZERS[config.optimizer.optimizer].state_bytes,
        step=measure_step(model, config, latents, model.family.measured_text(conditioning), compute_dtype)
        + measure_text_step(model, examples, config),
        overhead=CUDA_OVERHEAD if model.device.type == "cuda" else 0)


def measure_text_step(model: LoadedModel, examples: TrainingSet, config: TrainingConfig) -> int:
    """What the text encoders keep for their backward pass while the denoiser steps, when they
    train: measured on one real encode of a batch of captions (its activations and output, counted
    while alive). No backward runs, so no gradient is touched; 0 when the text encoder is frozen."""
    if not config.lora.train_text_encoder:
        return 0
    captions = [examples.examples[0].caption] * config.train.batch_size  # every caption pads to the same length
    counter = LiveTensorBytes()
    with torch.enable_grad(), counter:
        conditioning = model.encoders.encode_prompts(captions)
        del conditioning
    return counter.peak


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created while it is active and still alive, and their
    peak: on a meta-device copy it is the estimate of a step; on the CPU the measurement of the
    same quantity, free of what RSS adds (the allocator's cache, libraries, fragmentation).
    Storage that existed before entry is not counted. On CUDA, torch.cuda.max_memory_allocated
    measures the same more cheaply."""

    def __init__(self) -> None:
        super().__init__()
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new (a frozen weight's
        # transpose in a linear layer must not count as the step's memory).
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor):  # meta tensors too: their storage knows its size
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs and storage not in self._counted:
                    size = storage.nbytes()
                    self._counted[storage] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, size)
        return output


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (for the CPU: available RAM), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _alternatives(model: LoadedModel, config: TrainingConfig) -> list[tuple[str, TrainingConfig, int]]:
    """Settings that need less memory, mildest first: (advice, config, bytes it frees in the base)."""
    train, changes = config.train, []
    if not train.gradient_checkpointing:
        changes.append(("turn on gradient_checkpointing", {"gradient_checkpointing": True}))
    if train.batch_size > 1:
        accumulation = train.batch_size * train.gradient_accumulation
        changes.append((f"set batch_size 1 and gradient_accumulation {accumulation} (same effective batch)",
                        {"batch_size": 1, "gradient_accumulation": accumulation}))
    if len(changes) > 1:
        changes.append((" and ".join(text for text, _ in changes), {k: v for _, c in changes for k, v in c.items()}))
    options = [(text, build_config(change, base=config), 0) for text, change in changes]
    if not train.fp8_base:  # the base shrinks to one byte per linear weight
        freed = float8_bytes_saved(model.denoiser, kept=model.family.fp8_kept)
        all_changes = {k: v for _, c in changes for k, v in c.items()}
        options.append(("turn on fp8_base" + (" and " + " and ".join(t for t, _ in changes[:2]) if changes else ""),
                        build_config({**all_changes, "fp8_base": True}, base=config), freed))
    return options


def check_memory(model: LoadedModel, examples: TrainingSet, config: TrainingConfig,
                 compute_dtype: torch.dtype) -> MemoryEstimate:
    """Log the estimate; refuse a run whose extra memory exceeds what is free, saying what fits."""
    estimate = estimate_memory(model, examples, config, compute_dtype)
    free = free_memory(model.device)
    log.info("Memory estimate: %s (%s free: %s)", estimate.describe(), model.device.type,
             f"{free / GIB:.2f} GiB" if free is not None else "unknown")
    if free is None or estimate.training <= free or not config.train.check_memory:
        return estimate
    advice = "lower resolution, rank or batch_size"
    for text, alternative, freed in _alternatives(model, config):
        if estimate_memory(model, examples, alternative, compute_dtype).training <= free + freed:
            advice = text
            break
    raise LoraLabError(f"This run needs about {estimate.training / GIB:.1f} GiB more {model.device.type} memory "
                       f"but {free / GIB:.1f} GiB is free ({estimate.describe()}). To fit: {advice}. Turn off "
                       "check_memory to try anyway.")


def planned_disk_bytes(model: LoadedModel, config: TrainingConfig, first_step: int) -> int:
    """LoRA files and their resume files for every checkpoint still to be written."""
    steps, every = config.train.steps, config.output.save_every
    checkpoints = len({s for s in range(first_step, steps + 1) if s % every == 0} | {steps})
    weights = sum(p.numel() for p in lora_parameters(model))
    per_checkpoint = weights * (2 + 4 + OPTIMIZERS[config.optimizer.optimizer].state_bytes) + 2**20
    return checkpoints * per_checkpoint


def check_disk(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise LoraLabError(f"The run's checkpoints need about {needed / GIB:.2f} GiB but {run_dir} has "
                           f"{free / GIB:.2f} GiB free. Free some space, save less often (save_every), or choose "
                           "another output folder.")
