"""8-bit float storage for the frozen base model's linear layers: half the memory of bf16, a
quarter of fp32, while every product is computed in the input's precision.

Each weight is kept as float8 (e4m3) with one fp32 scale per output row. A layer dequantizes its
weight for the matmul and throws it away; the backward pass dequantizes again instead of keeping
the full-precision copy, so no layer's full weight outlives its own use. LoRA adapters wrap these
layers like any nn.Linear and train in fp32 (PEFT reads `compute_dtype` for their dtype).

Why not a library: torchao's float8 weight paths need recent CUDA GPUs, and PEFT has no LoRA
layer for optimum-quanto's modules; this file is small and runs the same on CPU and GPU.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T + b with W stored in float8; only the float8 copy is kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):  # type: ignore[override]
        ctx.save_for_backward(weight, scale)
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, scale = ctx.saved_tensors
        return grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)[:, None]), None, None, None


class Float8Linear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in float8 with per-row scales."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, bias)


def dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as numbers (a float8 one dequantized with its row scales)."""
    if isinstance(linear, Float8Linear):
        return linear.weight.to(linear.compute_dtype) * linear.weight_scale.to(linear.compute_dtype)[:, None]
    return linear.weight


def to_float8(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
    """Convert one linear layer in place (its weight is frozen from now on)."""
    weight = linear.weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FLOAT8_MAX
    linear.weight = torch.nn.Parameter((weight / scale[:, None]).to(FLOAT8), requires_grad=False)
    linear.register_buffer("weight_scale", scale)
    linear.compute_dtype = compute_dtype
    linear.__class__ = Float8Linear


def quantizable_layers(module: torch.nn.Module, kept: str | None = None) -> list[torch.nn.Linear]:
    """The plain nn.Linear layers of `module`, except those whose full name matches `kept` (a
    family's `fp8_kept`: layers whose weight dtype the model reads to pick its compute dtype)."""
    return [layer for name, layer in module.named_modules()
            if type(layer) is torch.nn.Linear and not (kept and re.fullmatch(kept, name))]


def float8_bytes_saved(module: torch.nn.Module, element_size: int | None = None, kept: str | None = None) -> int:
    """What quantize_linear_layers frees on `module`: each plain linear weight goes from
    `element_size` bytes an element (default: its dtype's) to one, plus a 4-byte scale per row.
    Also the memory estimate's and the real-size benchmark's (on the meta device) figure."""
    return sum(layer.weight.numel() * ((element_size or layer.weight.element_size()) - 1) - 4 * layer.weight.shape[0]
               for layer in quantizable_layers(module, kept))


def quantize_linear_layers(module: torch.nn.Module, compute_dtype: torch.dtype, kept: str | None = None) -> int:
    """Every plain nn.Linear of `module` (but those `kept` names) to float8 storage; returns the bytes saved."""
    saved = float8_bytes_saved(module, kept=kept)
    for layer in quantizable_layers(module, kept):
        to_float8(layer, compute_dtype)
    return saved
