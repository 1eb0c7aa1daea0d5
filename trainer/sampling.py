"""Pictures of a run: sample images at chosen LoRA strengths, and the checkpoint × strength grid
with its labels wrapped, never cut."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .export import load_into_model
from .families.base import LoadedModel
from .lora import lora_parameters, set_strength
from .previews import PreviewSampler


def fill_trigger(prompt: str, trigger_words: Sequence[str]) -> str:
    return prompt.replace("{trigger}", ", ".join(trigger_words)).strip(" ,")


def held_dtype(model: LoadedModel) -> torch.dtype:
    """The dtype the frozen base holds its weights in, which it computes in: the run's compute dtype
    where it was loaded in one (bf16 on a GPU, or on a CPU with bf16 units), else fp32. Weights held
    in 8-bit float dequantize to the dtype of the layers around them."""
    trained = {id(parameter) for parameter in lora_parameters(model)}
    for parameter in model.denoiser.parameters():
        if id(parameter) not in trained and parameter.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return parameter.dtype
    return torch.float32


@contextlib.contextmanager
def lora_strength(model: LoadedModel, strength: float) -> Iterator[None]:
    """The model's LoRA at `strength` (0 = the base model) for the block, then back at 1."""
    set_strength(model, strength)
    try:
        yield
    finally:
        set_strength(model, 1.0)


def sample(model: LoadedModel, prompts: Sequence[str], strength: float, size: tuple[int, int], steps: int,
           guidance_scale: float, seed: int) -> list[Image.Image]:
    """One image per prompt from the model with its LoRA at `strength`."""
    with lora_strength(model, strength):
        return PreviewSampler(model, prompts, size, steps, guidance_scale, seed, held_dtype(model)).sample()


def sample_grid(model: LoadedModel, checkpoints: Sequence[tuple[str, Path]], prompts: Sequence[str],
                strengths: Sequence[float], size: tuple[int, int], steps: int, guidance_scale: float,
                seed: int) -> tuple[Image.Image, dict[tuple[str, str, float], Image.Image]]:
    """Rows: checkpoint (× prompt); columns: strength. Every cell uses the same seed.

    Returns the labelled grid and the cells by (checkpoint label, prompt, strength). Strength 0 is
    the base model whatever the checkpoint, so it is sampled once. The prompts are encoded once."""
    sampler = PreviewSampler(model, prompts, size, steps, guidance_scale, seed, held_dtype(model))
    cells: dict[tuple[str, str, float], Image.Image] = {}
    base: list[Image.Image] = []
    for label, path in checkpoints:
        load_into_model(model, path)
        for strength in strengths:
            if strength == 0 and base:
                images = base
            else:
                with lora_strength(model, strength):
                    images = sampler.sample()
                if strength == 0:
                    base = images
            cells.update({(label, prompt, strength): image for prompt, image in zip(prompts, images, strict=True)})
    rows = [(label + (f"\n{prompt}" if len(prompts) > 1 else ""), [cells[(label, prompt, s)] for s in strengths])
            for label, _ in checkpoints for prompt in prompts]
    return labelled_grid(rows, [f"strength {s:g}" for s in strengths]), cells


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Lines of at most `width` pixels; a word longer than that is broken, never cut off."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # one overlong word: break it
                cut = max(1, next(i for i in range(len(line), 0, -1) if font.getlength(line[:i]) <= width))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], column_labels: Sequence[str],
                  cell_size: int = 256, label_width: int = 240, font_size: int = 16,
                  corner: str = "") -> Image.Image:
    """Images in rows and columns, with each row's label (wrapped, never cut) on the left and
    each column's above; `corner` is written above the row labels (e.g. what every cell holds).
    Small images are enlarged to `cell_size` with sharp pixels."""
    font = ImageFont.load_default(size=font_size)
    pad, line_height = 8, round(font_size * 1.35)
    corner_lines = wrap_text(corner, font, label_width - 2 * pad) if corner else []
    header = max(len(corner_lines), *(len(wrap_text(t, font, cell_size - 2 * pad)) for t in column_labels)
                 ) * line_height + 2 * pad
    labels = [wrap_text(text, font, label_width - 2 * pad) for text, _ in rows]
    heights = [max(cell_size, len(lines) * line_height + 2 * pad) for lines in labels]
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * cell_size, header + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for number, line in enumerate(corner_lines):
        draw.text((pad, pad + number * line_height), line, fill="#444444", font=font)
    for column, text in enumerate(column_labels):
        for number, line in enumerate(wrap_text(text, font, cell_size - 2 * pad)):
            draw.text((label_width + column * cell_size + pad, pad + number * line_height), line, fill="black",
                      font=font)
    top = header
    for (_, images), lines, height in zip(rows, labels, heights, strict=True):
        text_top = top + (height - len(lines) * line_height) // 2
        for number, line in enumerate(lines):
            draw.text((pad, text_top + number * line_height), line, fill="black", font=font)
        for column, image in enumerate(images):
            scale = (cell_size - 4) / max(image.size)  # a 4 px white gutter between cells
            resized = image.resize((round(image.width * scale), round(image.height * scale)),
                                   Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS)
            grid.paste(resized, (label_width + column * cell_size + (cell_size - resized.width) // 2,
                                 top + (height - resized.height) // 2))
        draw.line([(0, top), (grid.width, top)], fill="#dddddd")
        top += height
    return grid
