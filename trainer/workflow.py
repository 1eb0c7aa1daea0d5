"""The training graph a LoRA file carries, so dropping the file onto ComfyUI opens it.

ComfyUI's frontend reads a dropped `.safetensors` file's header (its first 4 MB) and opens the
UI workflow in `__metadata__["workflow"]`, or else the API prompt in `__metadata__["prompt"]`, the
same way it opens a `.latent` file. A run started from a graph stores that graph (the workflow and
the prompt ComfyUI queued); a run from the command line stores an API prompt built from its
config (model loader → Load Dataset → Train LoRA → Sample Checkpoint), which the frontend lays out
itself. Every local path is cut to its file or folder name, as the config in the metadata is.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from .config import AUTO, TrainingConfig, field_specs
from .doctor import LORA_TYPES
from .families.base import ModelFamily

log = logging.getLogger(__name__)

# The whole header must fit in the 4 MB the frontend reads; the graph gets a quarter of it (thumbnails,
# the config and the tag counts share the rest).
MAX_GRAPH_BYTES = 1024 * 1024
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def without_local_paths(value: Any) -> Any:
    """`value` (a workflow, a prompt, any JSON) with every string that is an absolute local path cut
    to its last part: a dataset folder, a model file, a user's home stay on the machine."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and "\n" not in value and _ABSOLUTE.match(value):
        path = PureWindowsPath(value) if "\\" in value else PurePosixPath(value)
        return path.name or value
    return value


def graph_metadata(workflow: dict | None, prompt: dict | None) -> dict[str, str]:
    """The `workflow` and `prompt` metadata entries for a graph, paths cut; a graph too large for the
    frontend's 4 MB header read is left out (the LoRA itself is unaffected), and said so."""
    entries = {key: json.dumps(without_local_paths(value), separators=(",", ":"))
               for key, value in (("workflow", workflow), ("prompt", prompt)) if value}
    size = sum(len(text.encode()) for text in entries.values())
    if size > MAX_GRAPH_BYTES:
        log.warning("The training graph is %.1f MB, too large to store in the LoRA file (at most %.1f MB); the "
                    "file will not open its workflow when dropped onto ComfyUI.", size / 1e6, MAX_GRAPH_BYTES / 1e6)
        return {}
    return entries


def _loaders(family: ModelFamily, base_model: str, fp8: bool) -> tuple[dict[str, dict], list, list, list]:
    """Loader nodes for the base model as the family's ComfyUI users hold it, and the (node, slot)
    of its MODEL, CLIP and VAE."""
    name = PurePosixPath(base_model.replace("\\", "/")).name or "your_model.safetensors"
    if not name.endswith((".safetensors", ".ckpt")):
        name += ".safetensors"  # a diffusers folder: ComfyUI loads its single-file export
    encoders = family.comfy_text_encoders
    if not encoders:
        return ({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}},
                ["1", 0], ["1", 1], ["1", 2])
    clip = ({"class_type": "CLIPLoader", "inputs": {"clip_name": encoders[0], "type": family.comfy_clip_type}}
            if len(encoders) == 1 else
            {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": encoders[0], "clip_name2": encoders[1],
                                                        "type": family.comfy_clip_type}})
    return ({"1": {"class_type": "UNETLoader", "inputs": {"unet_name": name,
                                                          "weight_dtype": "fp8_e4m3fn" if fp8 else "default"}},
             "2": clip, "3": {"class_type": "VAELoader", "inputs": {"vae_name": family.comfy_vae}}},
            ["1", 0], ["2", 0], ["3", 0])


def _settings(config: TrainingConfig) -> dict[str, Any]:
    """Every setting but the local paths, by name: Train LoRA's widgets are the trainer's settings of
    the same names (the frontend sets those and ignores the rest, as ComfyUI's validation does)."""
    values = {}
    for name, (section, spec) in field_specs().items():
        if section != "model" and not spec.metadata["path"]:
            value = getattr(getattr(config, section), name)
            values[name] = "\n".join(map(str, value)) if isinstance(value, tuple) else value
    return values


def cli_prompt(config: TrainingConfig, family: ModelFamily) -> dict[str, dict]:
    """The API prompt of a graph that trains what the config trains: the family's loaders, Load
    Dataset with the dataset folder's name and trigger word, Train LoRA with every setting, and
    Sample Checkpoint on its run."""
    loaders, model, clip, vae = _loaders(family, config.model.base_model, config.train.fp8_base)
    preset = config.train.preset
    settings = {**_settings(config), "resume": "off"}  # the opened workflow starts a run of its own
    resolution = config.data.resolution if config.data.resolution != AUTO else family.default_resolution
    dataset = PurePosixPath((config.data.dataset or "my_dataset").replace("\\", "/")).name
    return {
        **loaders,
        "4": {"class_type": "LoraLabLoadDataset", "inputs": {
            "folder": dataset, "lora_type": preset if preset in LORA_TYPES else "style",
            "trigger_word": config.data.trigger_word, "model": model}},
        "5": {"class_type": "LoraLabTrainLora", "inputs": {
            **settings, "model": model, "clip": clip, "vae": vae, "dataset": ["4", 0]}},
        "6": {"class_type": "LoraLabSampleCheckpoint", "inputs": {
            "prompts": "\n".join(config.sample.prompts), "negative": "",
            "strengths": ", ".join(f"{strength:g}" for strength in config.sample.strengths),
            "seed": config.sample.sample_seed, "steps": config.sample.sample_steps,
            "cfg": config.sample.guidance_scale, "sampler_name": "euler",
            "scheduler": family.comfy_scheduler, "width": resolution, "height": resolution,
            "model": model, "clip": clip, "vae": vae, "training_run": ["5", 2]}},
    }
