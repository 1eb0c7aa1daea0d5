"""Pictures of a run: sample images at chosen LoRA strengths, the checkpoint × strength grid, and
the loss curve, drawn with Pillow alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .export import load_into_model
from .families.base import LoadedModel
from .lora import set_strength


def fill_trigger(prompt: str, trigger_words: Sequence[str]) -> str:
    return prompt.replace("{trigger}", ", ".join(trigger_words)).strip(" ,")


@torch.no_grad()
def sample(model: LoadedModel, prompt: str, strength: float, size: tuple[int, int], steps: int,
           guidance_scale: float, seed: int) -> Image.Image:
    """One image from the model with its LoRA at `strength` (0 = the base model)."""
    set_strength(model, strength)
    pipe = model.family.pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    try:
        output = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                      width=size[0], height=size[1], generator=torch.Generator().manual_seed(seed))
    finally:
        set_strength(model, 1.0)
    return output.images[0]


def sample_grid(model: LoadedModel, checkpoints: Sequence[tuple[str, Path]], prompts: Sequence[str],
                strengths: Sequence[float], size: tuple[int, int], steps: int, guidance_scale: float,
                seed: int) -> tuple[Image.Image, dict[tuple[str, str, float], Image.Image]]:
    """Rows: checkpoint (× prompt); columns: strength. Every cell uses the same seed.

    Returns the labelled grid and the cells by (checkpoint label, prompt, strength)."""
    cells: dict[tuple[str, str, float], Image.Image] = {}
    for label, path in checkpoints:
        load_into_model(model, path)
        for prompt in prompts:
            for strength in strengths:
                cells[(label, prompt, strength)] = sample(model, prompt, strength, size, steps, guidance_scale, seed)
    rows = [(f"{label}" + (f" | {prompt}" if len(prompts) > 1 else ""), [cells[(label, prompt, s)] for s in strengths])
            for label, _ in checkpoints for prompt in prompts]
    return labelled_grid(rows, [f"strength {s:g}" for s in strengths]), cells


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], column_labels: Sequence[str],
                  cell_size: int = 160) -> Image.Image:
    font = ImageFont.load_default()
    label_width, header = 150, 24
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * cell_size, header + len(rows) * cell_size), "white")
    draw = ImageDraw.Draw(grid)
    for column, text in enumerate(column_labels):
        draw.text((label_width + column * cell_size + 6, 6), text, fill="black", font=font)
    for row, (text, images) in enumerate(rows):
        top = header + row * cell_size
        draw.text((6, top + cell_size // 2 - 6), text[:24], fill="black", font=font)
        for column, image in enumerate(images):
            scale = cell_size / max(image.size)
            resized = image.resize((round(image.width * scale), round(image.height * scale)),
                                   Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS)
            grid.paste(resized, (label_width + column * cell_size, top))
    return grid


def moving_average(values: Sequence[float], window: int) -> list[float]:
    result, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        result.append(total / min(index + 1, window))
    return result


def loss_plot(losses: Sequence[tuple[int, float, float]], title: str = "loss", size=(720, 320)) -> Image.Image:
    """Per-step loss (light) and its moving average (dark) against the step."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, 16, 28, 30
    draw.text((left, 8), title, fill="black", font=font)
    if not losses:
        draw.text((left, height // 2), "no steps yet", fill="gray", font=font)
        return image
    steps = [s for s, _, _ in losses]
    values = [v for _, v, _ in losses]
    smooth = moving_average(values, max(3, len(values) // 20))
    low, high = min(values), max(values)
    high = high if high > low else low + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = top + (high - value) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline="#999999")
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        y = point(first, value)[1]
        draw.text((4, y - 6), f"{value:.4f}", fill="black", font=font)
    draw.text((left, height - bottom + 6), str(first), fill="black", font=font)
    draw.text((width - right - 40, height - bottom + 6), f"step {last}", fill="black", font=font)
    if len(values) > 1:
        draw.line([point(s, v) for s, v in zip(steps, values, strict=True)], fill="#9ecae1", width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth, strict=True)], fill="#08519c", width=2)
    return image
