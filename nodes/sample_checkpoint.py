"""Sample Checkpoint: a grid of checkpoint × strength × prompt, each cell sampled exactly as
LoraLoader + KSampler would with the same settings and seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..trainer.errors import LoraLabError
from ..trainer.metadata import thumbnail_url
from ..trainer.sampling import fill_trigger, labelled_grid
from . import comfy_bridge as comfy
from .comfy_bridge import RUN, io, ui
from .values import CHECKPOINT_CHOICES, TrainingRun

DEFAULT_STRENGTHS = "0, 0.4, 0.7, 1.0"  # the guide: start at 0.7, try 0.4-1.0


def parse_strengths(text: str) -> list[float]:
    try:
        strengths = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise LoraLabError(f"strengths {text!r} must be numbers separated by commas, e.g. {DEFAULT_STRENGTHS}."
                           ) from None
    if not strengths or any(not -10 <= s <= 10 for s in strengths):
        raise LoraLabError(f"strengths {text!r}: give one or more values between -10 and 10.")
    return strengths


def checkpoints_to_sample(run: TrainingRun | None, lora_names: str,
                          choice: str = "all") -> list[tuple[str, Path, tuple[str, ...]]]:
    """(row label, file, trigger words) for the chosen checkpoints of the run, then every named file."""
    rows = [(f"step {step}" + (" (recommended)" if step == run.best_step else ""), path, run.trigger_words)
            for step, path in run.choose(choice)] if run else []
    for name in (line.strip() for line in lora_names.splitlines()):
        if name:
            rows.append((Path(name).stem, comfy.lora_path(name), ()))
    if not rows:
        raise LoraLabError("Nothing to sample: connect a training_run or list LoRA files in lora_names.")
    return rows


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


class SampleCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabSampleCheckpoint", display_name="Sample Checkpoint", category="LoRA Lab",
            description="Compare checkpoints and strengths side by side in one labelled grid.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRAs are applied to (loaded once)."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                io.Vae.Input("vae", tooltip="Decodes the samples."),
                io.String.Input("prompts", multiline=True, default="{trigger}",
                                tooltip="One prompt per line; {trigger} becomes the LoRA's trigger word(s)."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt for every cell (FLUX.1-dev samples without one, as "
                                        "at cfg 1)."),
                io.String.Input("strengths", default=DEFAULT_STRENGTHS, tooltip="LoRA strengths, one column each."),
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
                RUN.Input("training_run", optional=True, tooltip="Every checkpoint of a Train LoRA run."),
                io.String.Input("lora_names", optional=True, multiline=True, default="",
                                tooltip="LoRA files from the loras folder, one per line (as LoraLoader lists them)."),
                io.String.Input("checkpoints", optional=True, default="all",
                                tooltip=f"Which of the run's checkpoints: {CHECKPOINT_CHOICES} (e.g. 500, 1000). "
                                        "'best' is the recommended one (so far, while the run trains)."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts: str, negative: str, strengths: str, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                training_run: TrainingRun | None = None, lora_names: str = "",
                checkpoints: str = "all") -> io.NodeOutput:
        strength_values = parse_strengths(strengths)
        prompt_lines = [line.strip() for line in prompts.splitlines() if line.strip()] or ["{trigger}"]
        rows_to_sample = checkpoints_to_sample(training_run, lora_names, checkpoints)
        texts = {fill_trigger(prompt, triggers) for _, _, triggers in rows_to_sample for prompt in prompt_lines}
        # Strength 0 is the base model whatever the checkpoint: one image per prompt text serves every row.
        zero = 0 in strength_values
        total = len(rows_to_sample) * len(prompt_lines) * (len(strength_values) - zero) + zero * len(texts)
        node_id = cls.hidden.unique_id
        progress = comfy.NodeProgress(node_id, total)
        base: dict[str, torch.Tensor] = {}
        encodings = TextEncodings(clip)
        distilled = comfy.is_guidance_distilled(model)  # its negative is never evaluated, so not encoded
        rows, cells, done = [], [], 0
        for label, path, triggers in rows_to_sample:
            lora = comfy.load_lora_file(path)
            for prompt in prompt_lines:
                text = fill_trigger(prompt, triggers)
                images = []
                for strength in strength_values:
                    if strength == 0 and text in base:
                        images.append(base[text])
                        continue
                    patched_model, patched_clip = comfy.apply_lora(model, clip, lora, strength, strength)
                    state = (str(path), strength)
                    image = comfy.sample_image(patched_model, vae, encodings(patched_clip, state, text),
                                               None if distilled else encodings(patched_clip, state, negative),
                                               seed, steps, cfg, sampler_name, scheduler, width, height)
                    images.append(image)
                    if strength == 0:
                        base[text] = image
                    done += 1
                    progress.update(done)
                    comfy.send(comfy.CELL_EVENT, {"node": node_id, "done": done, "total": total,
                                                  "label": f"{label} · strength {strength:g} · {text}",
                                                  "image": thumbnail_url(comfy.images_to_pil(image)[0], 96)})
                cells += images
                rows.append((label + (f"\n{text}" if len(prompt_lines) > 1 else ""),
                             [comfy.images_to_pil(image)[0] for image in images]))
        columns = [f"strength {s:g}" for s in strength_values]
        picture = labelled_grid(rows, columns, cell_size=min(512, max(256, width, height)))
        grid = comfy.pil_to_images([picture])
        images = torch.cat(cells)
        return io.NodeOutput(grid, images, ui=grid_view(columns, [label for label, _ in rows], images, cls))


def grid_view(columns: list[str], rows: list[str], cells: torch.Tensor, cls: type) -> dict:
    """What the node shows: the grid as cells and text labels (web/lora_lab.js lays them out at a
    size that reads on the node, and opens a cell full size on a click); the grid picture itself
    is the grid output."""
    saved = ui.PreviewImage(cells, cls=cls).as_dict()["images"]  # each cell as a temporary image
    width = len(columns)
    return {"lora_lab_grid": [{"columns": columns, "rows": [
        {"label": label, "cells": saved[index * width:(index + 1) * width]} for index, label in enumerate(rows)]}]}
