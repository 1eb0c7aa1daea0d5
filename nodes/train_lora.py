"""Train LoRA: trains on the graph's own MODEL, CLIP and VAE and hands the result straight on
(MODEL and CLIP with the LoRA applied), with progress, live loss and a Cancel that saves."""

from __future__ import annotations

import logging
from pathlib import Path

from ..trainer.config import TrainingConfig, build_config
from ..trainer.errors import LoraLabError
from ..trainer.resume import SUFFIX
from ..trainer.run import TrainingResult, train_lora
from ..trainer.sampling import loss_plot
from . import comfy_bridge as comfy
from . import graph_model
from .comfy_bridge import DATASET, RUN, io, ui
from .settings_widgets import setting_widget
from .values import DatasetValue, TrainingRun

# Widgets in this order are public API: workflow files store widget values by position.
SETTINGS = ("preset", "steps", "rank", "alpha", "learning_rate", "resolution", "batch_size", "optimizer",
            "lr_scheduler", "warmup_steps", "save_every", "seed", "name", "gradient_checkpointing",
            "mixed_precision", "min_snr_gamma", "noise_offset", "bucketing", "resume", "resume_with_changes")
NEW_RUN, LATEST = "off", "latest"

log = logging.getLogger(__name__)


def unique_name(folder: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... so an earlier run is never overwritten."""
    candidate, number = name, 1
    while (folder / candidate).exists():
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def resume_choices(output_dir: Path) -> list[str]:
    """The resume widget's options: a new run, the latest checkpoint of the named run, or any
    checkpoint that has a resume file (as '<run>/<file>')."""
    found = sorted(output_dir.glob(f"*/*{SUFFIX}")) if output_dir.is_dir() else []
    return [NEW_RUN, LATEST, *(f"{path.parent.name}/{path.name}" for path in found)]


def chosen_checkpoint(output_dir: Path, choice: str) -> Path:
    """A '<run>/<file>.resume' choice as a path, which must lie inside the LoRA Lab folder: the
    choice may come from a stranger's workflow."""
    root = output_dir.resolve()
    path = (output_dir / choice).resolve()
    if not path.is_relative_to(root) or path.suffix != SUFFIX or not path.is_file():
        raise LoraLabError(f"resume = {choice!r} is not a checkpoint of a run in {output_dir}; choose 'latest' or "
                           "one of the listed checkpoints (refresh the page to see new ones).")
    return path


def node_config(values: dict, output_dir: Path) -> TrainingConfig:
    settings = {**values, "output_dir": str(output_dir)}
    name = str(values.get("name", "my_lora")).strip() or "my_lora"
    resume = str(values.get("resume", NEW_RUN))
    if resume == NEW_RUN:
        settings.update(resume="", name=unique_name(output_dir, name))
    elif resume == LATEST:
        settings.update(resume=LATEST, name=name)
    else:  # a chosen checkpoint continues in its own run folder
        path = chosen_checkpoint(output_dir, resume)
        settings.update(resume=str(path), name=path.parent.name)
    return build_config(settings)


def run_value(result: TrainingResult) -> TrainingRun:
    return TrainingRun(result.config.output.name, tuple((c.step, c.path) for c in result.checkpoints),
                       result.trigger_words, result.stopped)


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabTrainLora", display_name="Train LoRA", category="LoRA Lab",
            description="Train a LoRA on this graph's model; checkpoints go to models/loras/lora_lab/<name>/.",
            inputs=[
                io.Model.Input("model", tooltip="The base model from your checkpoint loader: the LoRA is trained "
                               "on exactly this model."),
                io.Clip.Input("clip", tooltip="Encodes the captions (once, before training)."),
                io.Vae.Input("vae", tooltip="Encodes the images (once, before training)."),
                DATASET.Input("dataset", tooltip="From Load Dataset or Caption."),
                setting_widget("preset"),
                setting_widget("steps"),
                setting_widget("rank"),
                setting_widget("alpha", step=1.0),
                setting_widget("learning_rate", step=1e-5, round=1e-7),
                *(setting_widget(name) for name in SETTINGS[5:12]),
                setting_widget("name", default="my_lora"),
                *(setting_widget(name) for name in SETTINGS[13:18]),
                io.Combo.Input("resume", options=resume_choices(comfy.lora_root() / comfy.LORA_SUBFOLDER),
                               default=NEW_RUN, tooltip="Continue a stopped run exactly where it stopped: 'latest' "
                               "= the newest checkpoint of the run called name, or a chosen checkpoint. 'off' "
                               "starts a new run (an existing name gets _2, _3, ...)."),
                setting_widget("resume_with_changes"),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     RUN.Output(display_name="training_run"), io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="lora_name")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset: DatasetValue, **settings) -> io.NodeOutput:
        family = graph_model.family_of(model)
        config = node_config({**settings, "family": family.name}, comfy.lora_root() / comfy.LORA_SUBFOLDER)
        events = comfy.NodeEvents(cls.hidden.unique_id, config.train.steps or 1)
        model_name = graph_model.model_file_name(cls.hidden.prompt, cls.hidden.unique_id)
        try:
            with comfy.training_mode():
                result = train_lora(config, events, model=graph_model.loaded_model(model, clip, vae, model_name),
                                    dataset=dataset.dataset)
                result.model = None  # the adapter and optimizer go now, before sampling needs the memory
        finally:
            comfy.release_training_memory()
        if result.stopped:
            step = result.checkpoints[-1].step
            message = (f"Stopped at step {step} of {result.config.train.steps}; saved {result.final_path.name}. "
                       f"To continue, set resume to 'latest' (name {result.config.output.name}) and queue again.")
            log.info(message)
            comfy.send("lora_lab.stopped", {"node": cls.hidden.unique_id, "path": str(result.final_path),
                                            "message": message})
            comfy.raise_interrupted()
        lora = comfy.load_lora_file(result.final_path)
        model_out, clip_out = comfy.apply_lora(model, clip, lora, 1.0, 1.0)
        curve = comfy.pil_to_images([loss_plot(result.losses, title=f"{result.config.output.name}: loss")])
        name = comfy.lora_display_name(result.final_path)
        return io.NodeOutput(model_out, clip_out, run_value(result), curve, name,
                             ui=ui.PreviewImage(curve, cls=cls))
