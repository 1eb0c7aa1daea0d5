"""Apply LoRA Stack: several LoRAs on MODEL and CLIP at once (from the loras folder, a training
run, or an incoming LORA_STACK), with the guide's stacking strengths on request, and the active
trigger words read from the files. Inputs are never changed: patching works on clones."""

from __future__ import annotations

from ..trainer.errors import LoraLabError
from ..trainer.files import read_metadata
from ..trainer.metadata import trigger_words
from . import comfy_bridge as comfy
from . import graph_model
from .comfy_bridge import RUN, STACK, io
from .values import StackEntry, TrainingRun

SLOTS = 3
NONE = "None"
# The guide's "Combining with Other LoRAs": first 0.6-0.8, second 0.4-0.6, third 0.3-0.4 (midpoints).
AUTO_STRENGTHS = (0.7, 0.5, 0.35)


def auto_strength(position: int) -> float:
    return AUTO_STRENGTHS[min(position, len(AUTO_STRENGTHS) - 1)]


def build_stack(incoming: list[StackEntry] | None, run: TrainingRun | None, slots: list[tuple],
                auto: bool, checkpoint: str = "best", run_strength: float = 1.0) -> list[StackEntry]:
    """The stack in order: incoming entries, the run's chosen checkpoint, then the enabled slots."""
    stack = list(incoming or [])
    if run is not None:
        chosen = run.choose(checkpoint)
        if len(chosen) != 1 or checkpoint.strip().lower() == "all":
            raise LoraLabError(f"checkpoint {checkpoint!r}: a stack takes one checkpoint of the run: latest, best or "
                               "one step number.")
        stack.append((comfy.lora_display_name(chosen[0][1]), run_strength, run_strength))
    stack += [(name, model_strength, clip_strength) for name, model_strength, clip_strength, on in slots
              if on and name != NONE]
    if auto:
        stack = [(name, auto_strength(i), auto_strength(i)) for i, (name, _, _) in enumerate(stack)]
    return stack


class ApplyLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slot_inputs = []
        for n in range(1, SLOTS + 1):
            slot_inputs += [
                comfy.ListedCombo(f"lora_{n}", options=[NONE, *comfy.lora_names()], default=NONE,
                               tooltip=f"LoRA number {n} of the stack, from the loras folder."),
                io.Float.Input(f"model_strength_{n}", default=0.7 if n == 1 else 0.5, min=-10, max=10, step=0.05,
                               tooltip="Strength on the model (the guide: start at 0.7; lower when stacking)."),
                io.Float.Input(f"clip_strength_{n}", default=0.7 if n == 1 else 0.5, min=-10, max=10, step=0.05,
                               tooltip="Strength on the text encoder."),
                io.Boolean.Input(f"enabled_{n}", default=True, tooltip=f"Switch LoRA number {n} on or off."),
            ]
        return io.Schema(
            node_id="LoraLabApplyLoraStack", display_name="Apply LoRA Stack", category="LoRA Lab",
            description="Apply several LoRAs at once; outputs the stack and the active trigger words.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the LoRAs to (it is not changed)."),
                io.Clip.Input("clip", tooltip="The text encoder to apply the LoRAs to (it is not changed)."),
                io.Boolean.Input("auto_strengths", default=False, tooltip="Use the guide's stacking strengths "
                                 "(first 0.7, second 0.5, third and later 0.35) instead of the sliders."),
                *slot_inputs,
                STACK.Input("lora_stack", optional=True, tooltip="A LORA_STACK from another node (applied first)."),
                RUN.Input("training_run", optional=True, tooltip="Apply a checkpoint of this run (see checkpoint)."),
                io.String.Input("checkpoint", optional=True, default="best",
                                tooltip="Which checkpoint of training_run: best (the recommended one: lowest "
                                        "validation loss, else the last; so far, while the run trains), latest, "
                                        "or a step number."),
                io.Float.Input("run_strength", optional=True, default=0.7, min=-10, max=10, step=0.05,
                               tooltip="Strength of training_run's checkpoint on the model and the text encoder "
                                       "(the guide: start at 0.7)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     STACK.Output(display_name="lora_stack"), io.String.Output(display_name="trigger_words")],
        )

    @classmethod
    def execute(cls, model, clip, auto_strengths: bool, lora_stack=None, training_run=None, checkpoint: str = "best",
                run_strength: float = 1.0, **slots) -> io.NodeOutput:
        slot_values = [(slots[f"lora_{n}"], slots[f"model_strength_{n}"], slots[f"clip_strength_{n}"],
                        slots[f"enabled_{n}"]) for n in range(1, SLOTS + 1)]
        if lora_stack is not None and not isinstance(lora_stack, list | tuple):
            raise LoraLabError("lora_stack must be a LORA_STACK list of (name, model strength, clip strength).")
        stack = build_stack(lora_stack, training_run, slot_values, auto_strengths, checkpoint, run_strength)
        paths = [comfy.lora_path(name) for name, _, _ in stack]
        model, clip = comfy.apply_loras(model, clip, [(graph_model.lora_for(model, path), model_strength, clip_strength)
                                                      for path, (_, model_strength, clip_strength)
                                                      in zip(paths, stack, strict=True)])
        words = stack_trigger_words(paths)
        return io.NodeOutput(model, clip, stack, ", ".join(words), ui={"text": (applied_text(stack, training_run),)})


def stack_trigger_words(paths: list) -> list[str]:
    """The trigger words the stack's files declare, in stack order, each once."""
    words: list[str] = []
    for path in paths:
        words += [word for word in trigger_words(read_metadata(path)) if word not in words]
    return words


def applied_text(stack: list[StackEntry], run: TrainingRun | None) -> str:
    """What the node applied, slot by slot, as it shows it."""
    if not stack:
        return "Nothing applied: every slot is off or None."
    steps = {comfy.lora_display_name(path): step for step, path in (run.checkpoints if run else ())}
    lines = []
    for number, (name, model_strength, clip_strength) in enumerate(stack, start=1):
        step = steps.get(name)
        which = "" if step is None else f" (step {step}{', recommended' if run and step == run.best_step else ''})"
        lines.append(f"{number}. {name}{which}: model {model_strength:.2f}, clip {clip_strength:.2f}")
    return "Applied:\n" + "\n".join(lines)
