"""Sample Checkpoint: a grid of checkpoint × strength × prompt, each cell sampled exactly as
LoraLoader + KSampler would with the same settings and seed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..trainer.errors import LoraLabError
from ..trainer.sampling import fill_trigger
from . import comfy_bridge as comfy
from . import graph_model
from .comfy_bridge import RUN, io
from .grid_cells import GridCells, Sampling, grid_output, prompt_lines, sampling_inputs
from .grid_cells import parse_strengths as parse_strength_list
from .values import CHECKPOINT_CHOICES, TrainingRun

DEFAULT_STRENGTHS = "0, 0.4, 0.7, 1.0"  # the guide: start at 0.7, try 0.4-1.0


def parse_strengths(text: str) -> list[float]:
    return parse_strength_list(text, DEFAULT_STRENGTHS)


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
                *sampling_inputs(),
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
        prompt_texts = prompt_lines(prompts)
        rows_to_sample = checkpoints_to_sample(training_run, lora_names, checkpoints)
        texts = {fill_trigger(prompt, triggers) for _, _, triggers in rows_to_sample for prompt in prompt_texts}
        # Strength 0 is the base model whatever the checkpoint: one image per prompt text serves every row.
        zero = 0 in strength_values
        total = len(rows_to_sample) * len(prompt_texts) * (len(strength_values) - zero) + zero * len(texts)
        sampling = Sampling(seed, steps, cfg, sampler_name, scheduler, width, height)
        cells = GridCells(cls, model, clip, vae, negative, sampling, total)
        base: dict[str, torch.Tensor] = {}
        rows = []
        for label, path, triggers in rows_to_sample:
            lora = graph_model.lora_for(model, path)
            for prompt in prompt_texts:
                text = fill_trigger(prompt, triggers)
                images = []
                for strength in strength_values:
                    if strength == 0 and text in base:
                        images.append(base[text])
                        continue
                    patched_model, patched_clip = comfy.apply_lora(model, clip, lora, strength, strength)
                    image = cells.sample(patched_model, patched_clip, (str(path), strength), text,
                                         f"{label} · strength {strength:g}")
                    images.append(image)
                    if strength == 0:
                        base[text] = image
                rows.append((label + (f"\n{text}" if len(prompt_texts) > 1 else ""), images))
        return grid_output(cls, rows, [f"strength {s:g}" for s in strength_values], sampling)
