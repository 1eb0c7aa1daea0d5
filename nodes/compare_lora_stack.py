"""Compare LoRA Stack: how two LoRAs of a stack behave together, as a grid of their strengths
(columns: the first LoRA, rows: the second), the rest of the stack applied at its own strengths
under every cell. Each cell is what core LoraLoaders chained in stack order, CLIPTextEncode and
KSampler make with the same settings and seed; the base and each LoRA alone are in the grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..trainer.errors import LoraLabError
from ..trainer.sampling import fill_trigger
from . import comfy_bridge as comfy
from . import graph_model
from .apply_lora_stack import stack_trigger_words
from .comfy_bridge import STACK, io
from .grid_cells import GridCells, Sampling, grid_output, parse_strengths, prompt_lines, sampling_inputs
from .values import StackEntry

# The guide's "Combining with Other LoRAs": first LoRA 0.6-0.8, second 0.4-0.6; 0 shows the other alone.
DEFAULT_STRENGTHS_A = "0, 0.6, 0.7, 0.8"
DEFAULT_STRENGTHS_B = "0, 0.4, 0.5, 0.6"

Strengths = tuple[float, float, bool]  # (first LoRA, second LoRA, whether the rest of the stack is on)


def short_name(name: str) -> str:
    return Path(name).stem


def strength_label(name: str, strength: float) -> str:
    return f"{short_name(name)} {'off' if strength == 0 else f'{strength:g}'}"


def cells_to_sample(strengths_a: list[float], strengths_b: list[float], has_rest: bool) -> list[list[Strengths]]:
    """The grid's rows of cells. With a third LoRA (or more) under every cell, one more row has
    the rest off and the second LoRA at 0: the base and the first LoRA alone."""
    rows = [[(a, b, has_rest) for a in strengths_a] for b in strengths_b]
    if has_rest:
        rows.append([(a, 0.0, False) for a in strengths_a])
    return rows


def check_stack(stack: Any) -> list[StackEntry]:
    if not isinstance(stack, list | tuple) or not all(isinstance(e, list | tuple) and len(e) == 3 for e in stack):
        raise LoraLabError("lora_stack must be a LORA_STACK list of (name, model strength, clip strength): connect "
                           "Apply LoRA Stack's lora_stack output.")
    if len(stack) < 2:
        raise LoraLabError(f"The stack holds {len(stack)} LoRA{'' if len(stack) == 1 else 's'}; Compare LoRA Stack "
                           "needs two (or three) to compare. Turn on a second slot in Apply LoRA Stack, or compare "
                           "one LoRA's strengths with Sample Checkpoint.")
    return [(str(name), float(model_strength), float(clip_strength)) for name, model_strength, clip_strength in stack]


class CompareLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabCompareLoraStack", display_name="Compare LoRA Stack", category="LoRA Lab",
            description="Test how two LoRAs stack: a grid of their strengths, the base and each alone included.",
            inputs=[
                io.Model.Input("model", tooltip="The base model, without the stack's LoRAs (connect the one that "
                                                "feeds Apply LoRA Stack)."),
                io.Clip.Input("clip", tooltip="The base text encoder, without the stack's LoRAs."),
                io.Vae.Input("vae", tooltip="Decodes the samples."),
                STACK.Input("lora_stack", tooltip="Apply LoRA Stack's lora_stack: its first LoRA makes the columns, "
                                                  "its second the rows; a third (and any after it) is applied at its "
                                                  "own strengths under every cell."),
                io.String.Input("prompts", multiline=True, default="{trigger}",
                                tooltip="One prompt per line; {trigger} becomes the trigger words of every LoRA in "
                                        "the stack."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt for every cell (FLUX.1-dev samples without one, as at "
                                        "cfg 1)."),
                io.String.Input("strengths_a", default=DEFAULT_STRENGTHS_A,
                                tooltip="The first LoRA's strengths, one column each, on the model and the text "
                                        "encoder alike (the guide: 0.6-0.8 for the first of a stack; 0 shows the "
                                        "second alone)."),
                io.String.Input("strengths_b", default=DEFAULT_STRENGTHS_B,
                                tooltip="The second LoRA's strengths, one row each (the guide: 0.4-0.6 for the "
                                        "second; 0 shows the first alone)."),
                *sampling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, lora_stack, prompts: str, negative: str, strengths_a: str, strengths_b: str,
                seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, width: int,
                height: int) -> io.NodeOutput:
        stack = check_stack(lora_stack)
        (name_a, _, _), (name_b, _, _), rest = stack[0], stack[1], stack[2:]
        axis_a = parse_strengths(strengths_a, DEFAULT_STRENGTHS_A)
        axis_b = parse_strengths(strengths_b, DEFAULT_STRENGTHS_B)
        paths = [comfy.lora_path(name) for name, _, _ in stack]
        loras = [graph_model.lora_for(model, path) for path in paths]
        words = stack_trigger_words(paths)
        grid = cells_to_sample(axis_a, axis_b, bool(rest))
        wanted = {cell for row in grid for cell in row}
        texts = [fill_trigger(prompt, words) for prompt in prompt_lines(prompts)]
        sampling = Sampling(seed, steps, cfg, sampler_name, scheduler, width, height)
        cells = GridCells(cls, model, clip, vae, negative, sampling, len(wanted) * len(texts))
        rest_label = " + ".join(f"{short_name(name)} {strength:g}" for name, strength, _ in rest)
        rest_names = ", ".join(short_name(name) for name, _, _ in rest)
        sampled: dict[tuple[Strengths, str], torch.Tensor] = {}
        rows = []
        for text in texts:
            for row in grid:
                for a, b, rest_on in row:
                    if ((a, b, rest_on), text) in sampled:
                        continue
                    # Chained in stack order, as LoraLoader after LoraLoader (strength 0 applies nothing).
                    chain = [(loras[0], a, a), (loras[1], b, b)]
                    if rest_on:
                        chain += [(lora, ms, cs) for lora, (_, ms, cs) in zip(loras[2:], rest, strict=True)]
                    patched_model, patched_clip = comfy.apply_loras(model, clip, chain)
                    label = f"{strength_label(name_a, a)} + {strength_label(name_b, b)}"
                    sampled[(a, b, rest_on), text] = cells.sample(
                        patched_model, patched_clip, (a, b, rest_on), text,
                        label + (f" + {rest_label}" if rest_on else ""))
                b, rest_on = row[0][1], row[0][2]
                label = strength_label(name_b, b)
                if rest:
                    label += f"\n+ {rest_label}" if rest_on else f"\n{rest_names} off"
                if len(texts) > 1:
                    label += f"\n{text}"
                rows.append((label, [sampled[cell, text] for cell in row]))
        corner = f"under every cell but the last row: {rest_label}" if rest else ""
        return grid_output(cls, rows, [strength_label(name_a, a) for a in axis_a], sampling, corner)
