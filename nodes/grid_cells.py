"""What the grid nodes (Sample Checkpoint, Compare LoRA Stack) share: each cell sampled exactly as
CLIPTextEncode → KSampler → VAEDecode would with the same settings and seed, each text encoded
once per text-encoder state, progress and the k-of-n preview per cell, and the result both as a
grid picture (an output) and as cells with text labels (what the node shows)."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import torch

from ..trainer.errors import LoraLabError
from ..trainer.metadata import thumbnail_url
from ..trainer.sampling import labelled_grid
from . import comfy_bridge as comfy
from .comfy_bridge import io, ui


def parse_strengths(text: str, example: str) -> list[float]:
    """Strengths typed as `0, 0.4, 0.7`; `example` is what the message suggests instead."""
    try:
        strengths = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise LoraLabError(f"strengths {text!r} must be numbers separated by commas, e.g. {example}.") from None
    if not strengths or any(not -10 <= s <= 10 for s in strengths):
        raise LoraLabError(f"strengths {text!r}: give one or more values between -10 and 10.")
    return strengths


def prompt_lines(prompts: str) -> list[str]:
    return [line.strip() for line in prompts.splitlines() if line.strip()] or ["{trigger}"]


@dataclass(frozen=True)
class Sampling:
    """KSampler's settings, the same in every cell (in sample_image's argument order)."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int


def sampling_inputs() -> list:
    """KSampler's widgets, as both grid nodes show them (after their prompts and strengths)."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="The same seed for every cell (kept between runs, so grids compare)."),
        io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampler steps, as in KSampler."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance, as in KSampler. For FLUX.1-dev it is the distilled "
                               "guidance (3.5 is typical), as the FluxGuidance node sets it, and sampling "
                               "runs without CFG."),
        io.Combo.Input("sampler_name", options=comfy.SAMPLERS, default="euler", tooltip="As in KSampler."),
        io.Combo.Input("scheduler", options=comfy.SCHEDULERS, default="normal", tooltip="As in KSampler."),
        io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
        io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
    ]


class TextEncodings:
    """Each text encoded once per state of the text encoder. A LoRA without text-encoder keys (FLUX
    LoRAs) leaves the encoder as it was, so every cell shares the base's encodings: for FLUX a T5-XXL
    encode each (tens of seconds on a CPU) is saved per cell."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip
        self.encoded: dict[tuple, list] = {}

    def __call__(self, patched_clip: Any, lora: tuple, text: str) -> list:
        state = lora if comfy.text_encoder_changed(self.clip, patched_clip) else None
        if (state, text) not in self.encoded:
            self.encoded[state, text] = comfy.encode_text(patched_clip, text)
        return self.encoded[state, text]


class GridCells:
    """Samples a node's cells one by one, with the node's progress bar and its k-of-n preview."""

    def __init__(self, node: type[io.ComfyNode], model: Any, clip: Any, vae: Any, negative: str,
                 sampling: Sampling, total: int) -> None:
        self.node_id = node.hidden.unique_id
        self.vae, self.negative, self.sampling, self.total = vae, negative, sampling, total
        self.encodings = TextEncodings(clip)
        self.distilled = comfy.is_guidance_distilled(model)  # its negative is never evaluated, so not encoded
        self.progress = comfy.NodeProgress(self.node_id, total)
        self.done = 0

    def sample(self, patched_model: Any, patched_clip: Any, state: tuple, text: str, label: str) -> torch.Tensor:
        """One cell: `state` names the LoRAs and strengths applied (the text encodings' key)."""
        negative = None if self.distilled else self.encodings(patched_clip, state, self.negative)
        image = comfy.sample_image(patched_model, self.vae, self.encodings(patched_clip, state, text), negative,
                                   *astuple(self.sampling))
        self.done += 1
        self.progress.update(self.done)
        comfy.send(comfy.CELL_EVENT, {"node": self.node_id, "done": self.done, "total": self.total,
                                      "label": f"{label} · {text}",
                                      "image": thumbnail_url(comfy.images_to_pil(image)[0], 96)})
        return image


def grid_output(node: type[io.ComfyNode], rows: list[tuple[str, list[torch.Tensor]]], columns: list[str],
                sampling: Sampling, corner: str = "") -> io.NodeOutput:
    """The grid picture and every cell as outputs; on the node, the cells with text labels."""
    pictures = [(label, [comfy.images_to_pil(image)[0] for image in images]) for label, images in rows]
    picture = labelled_grid(pictures, columns, cell_size=min(512, max(256, sampling.width, sampling.height)),
                            corner=corner)
    cells = torch.cat([image for _, images in rows for image in images])
    return io.NodeOutput(comfy.pil_to_images([picture]), cells,
                         ui=grid_view(columns, [label for label, _ in rows], cells, node, corner))


def grid_view(columns: list[str], rows: list[str], cells: torch.Tensor, cls: type, corner: str = "") -> dict:
    """What the node shows: the grid as cells and text labels (web/lora_lab.js lays them out at a
    size that reads on the node, and opens a cell full size on a click); the grid picture itself
    is the grid output."""
    saved = ui.PreviewImage(cells, cls=cls).as_dict()["images"]  # each cell as a temporary image
    width = len(columns)
    return {"lora_lab_grid": [{"columns": columns, "corner": corner, "rows": [
        {"label": label, "cells": saved[index * width:(index + 1) * width]} for index, label in enumerate(rows)]}]}
