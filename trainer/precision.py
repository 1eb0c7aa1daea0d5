"""Which precision a run computes in, on the device it has: the `mixed_precision` setting resolved
once, and the autocast that applies it.

On a GPU, `auto` is bf16 where the GPU supports it, fp16 elsewhere. On a CPU, bf16 only pays where
the processor has bf16 units (x86 AVX512-BF16 or AMX, ARM's BF16 extension): there its matmuls run
about twice as fast as fp32; without them torch emulates bf16 and a step gets slower. So a CPU
without those units refuses bf16 (and fp16, which no CPU computes natively), and `auto` chooses bf16
on a CPU only where a short matmul timing, taken once per process, shows it faster. The LoRA
weights and the optimizer always stay in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .errors import LoraLabError

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 /proc/cpuinfo flags; "bf16" is ARM's feature
# `auto` takes bf16 on a CPU only when it is clearly faster: a smaller gain is lost to the casts.
CPU_BF16_MIN_SPEEDUP = 1.3
# Lets the test suite keep `auto` at fp32 on any CPU, so its numbers do not depend on the runner.
AUTO_CPU_BF16 = "LORA_LAB_AUTO_CPU_BF16"


def bf16_in_cpuinfo(text: str) -> bool:
    """Whether a Linux /proc/cpuinfo lists a bf16 unit among its CPU flags (x86) or features (ARM)."""
    words: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            words.update(line.split(":", 1)[-1].split())
    return bool(words & CPU_BF16_FLAGS)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this processor computes bf16 in hardware."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return bf16_in_cpuinfo(cpuinfo.read_text(errors="replace"))
    if platform.system() == "Darwin" and platform.machine() == "arm64":  # Apple M2 and later
        try:
            answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return False
        return answer == "1"
    return False


def _matmul_seconds(dtype: torch.dtype, side: int = 1024, repeats: int = 4) -> float:
    a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
    torch.mm(a, b)  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return (time.perf_counter() - started) / repeats


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU (measured once, ~0.1 s)."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def auto_cpu_bf16() -> bool:
    """Whether `auto` computes in bf16 on this CPU."""
    if os.environ.get(AUTO_CPU_BF16, "").lower() in ("0", "off", "no", "false"):
        return False
    return cpu_has_bf16() and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `mixed_precision` on `device`; refuses what the device cannot compute."""
    if mixed_precision == "no":
        return torch.float32
    if device.type == "cuda":
        if mixed_precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise LoraLabError("mixed_precision bf16 needs a GPU with bf16 support (NVIDIA Ampere, RTX 30xx, or "
                               "newer); this GPU has none. Set mixed_precision to auto (fp16 here) or fp16.")
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and auto_cpu_bf16() else torch.float32
    if device.type == "cpu":
        if mixed_precision == "fp16":
            raise LoraLabError("mixed_precision fp16 is for GPUs: a CPU has no fp16 units and would train slower "
                               "than in fp32. Set mixed_precision to auto (or bf16 on a CPU with bf16 units).")
        if not cpu_has_bf16():
            raise LoraLabError("mixed_precision bf16 needs a processor with bf16 units (AVX512-BF16 or AMX on "
                               "x86, the BF16 extension on ARM); this CPU has none, so bf16 would train slower "
                               "than fp32. Set mixed_precision to auto or no.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast_for(device: torch.device, compute_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision as the run computes: autocast to `compute_dtype`, or nothing for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)
