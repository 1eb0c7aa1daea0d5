"""The metadata written into every LoRA file: kohya `ss_*` keys (read by A1111/Forge, civitai and
other tools), Stability's `modelspec.*` keys, trigger words, and our full training config.

The `modelspec` keys tell the LoRA's story where ComfyUI's Model Library shows it: title,
description (what was trained, on how many images, for how many steps, and the guide's diagnosis
so far), a usage hint (the guide's starting strength and the trigger word), tags, the trigger
phrase and a thumbnail (a sample made at that checkpoint, as a small JPEG data URL)."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from dataclasses import dataclass, field

from PIL import Image

from .adapters import get_adapter
from .config import TrainingConfig
from .diagnosis import Diagnosis
from .families.base import ModelFamily
from .files import metadata_json

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class RunFacts:
    """What the metadata needs to know about a run beyond its config."""

    family: ModelFamily
    base_model: str
    resolution: int
    steps: int
    image_count: int
    trigger_words: tuple[str, ...]
    tag_frequency: dict[str, dict[str, int]]
    dataset_fingerprint: str
    prediction_type: str
    started_at: float
    session_id: str = ""
    resume_history: tuple[dict, ...] = ()  # settings or dataset changes accepted on resume
    graph: dict[str, str] = field(default_factory=dict)  # the training graph: workflow.py's entries
    started_from: dict[str, str] = field(default_factory=dict)  # the init_lora file (init_lora.starting_record)


@dataclass(frozen=True)
class CheckpointStory:
    """What a checkpoint's metadata says beyond its config: how the run was going when it was saved."""

    diagnosis: Diagnosis | None = None
    validation_loss: float | None = None
    thumbnail: Image.Image | None = None


THUMBNAIL_SIDE = 256


def jpeg_base64(image: Image.Image, side: int = THUMBNAIL_SIDE) -> str:
    """The image `side` pixels wide as a base64 JPEG (small pictures enlarged with sharp pixels)."""
    small = image.convert("RGB")
    small = small.resize((side, round(side * small.height / small.width)),
                         Image.Resampling.NEAREST if small.width * 2 <= side else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def thumbnail_url(image: Image.Image, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG data URL (the Model Library shows `modelspec.thumbnail` as an image)."""
    return "data:image/jpeg;base64," + jpeg_base64(image, side)


def story(config: TrainingConfig, facts: RunFacts, step: int, checkpoint: CheckpointStory) -> dict[str, str]:
    """The modelspec description, usage hint, tags and thumbnail of a checkpoint."""
    triggers = ", ".join(facts.trigger_words)
    preset = config.train.preset
    kind = f"{preset} " if preset != "none" else ""
    title = get_adapter(config.lora.adapter).title
    article = "An" if (kind or title)[0].lower() in "aeiou" else "A"
    description = (f"{article} {kind}{title} for {facts.family.title}, trained with LoRA Lab on "
                   f"{facts.image_count} images{f' of {triggers}' if triggers else ''}: step {step} of {facts.steps}, "
                   f"rank {config.lora.rank}, "
                   f"learning rate {config.optimizer.learning_rate:g}, {facts.resolution} px.")
    if checkpoint.validation_loss is not None:
        description += f" Validation loss {checkpoint.validation_loss:.4g}."
    if checkpoint.diagnosis is not None and checkpoint.diagnosis.pattern != "too_short":
        description += f" {checkpoint.diagnosis.advice}"
    hint = "Start at strength 0.7 and adjust between 0.4 and 1.0"
    hint += f"; put {triggers} in the prompt." if triggers else "."
    tags = ["lora", *([config.lora.adapter] if config.lora.adapter != "lora" else []), facts.family.name,
            *([preset] if preset != "none" else []), *facts.trigger_words]
    metadata = {"modelspec.description": description, "modelspec.usage_hint": hint,
                "modelspec.tags": ", ".join(tags)}
    if checkpoint.thumbnail is not None:
        picture = jpeg_base64(checkpoint.thumbnail)
        metadata["modelspec.thumbnail"] = "data:image/jpeg;base64," + picture
        # ComfyUI's model preview route (and other model browsers) read cover images from here, so
        # no picture file needs to sit beside every checkpoint.
        metadata["ssmd_cover_images"] = metadata_json([picture])
    if checkpoint.validation_loss is not None:
        metadata["lora_lab.validation_loss"] = f"{checkpoint.validation_loss:.6g}"
    if checkpoint.diagnosis is not None:
        metadata["lora_lab.diagnosis"] = checkpoint.diagnosis.pattern
    return metadata


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words a LoRA file declares (ours, then modelspec's)."""
    try:
        words = json.loads(metadata.get("lora_lab.trigger_words", "[]"))
    except json.JSONDecodeError:
        words = []
    if not isinstance(words, list):
        words = []
    if not words and metadata.get("modelspec.trigger_phrase"):
        words = [w.strip() for w in metadata["modelspec.trigger_phrase"].split(",")]
    return [w for w in words if isinstance(w, str) and w.strip()]


def new_session_id() -> str:
    return uuid.uuid4().hex


def build_metadata(config: TrainingConfig, facts: RunFacts, step: int,
                   checkpoint: CheckpointStory = CheckpointStory()) -> dict[str, str]:
    family = facts.family
    lora, optimizer, train = config.lora, config.optimizer, config.train
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    triggers = ", ".join(facts.trigger_words)
    name = config.output.name
    adapter = get_adapter(lora.adapter)
    return {
        "ss_network_module": adapter.network_module,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_args": metadata_json({**adapter.network_args(lora.adapter_options()), "targets": lora.targets}),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": facts.base_model,
        "ss_v2": "False",
        "ss_training_started_at": str(facts.started_at),
        "ss_output_name": name,
        "ss_steps": str(step),
        "ss_max_train_steps": str(facts.steps),
        "ss_learning_rate": f"{optimizer.learning_rate:g}",
        "ss_unet_lr": f"{optimizer.learning_rate:g}",
        "ss_text_encoder_lr": f"{optimizer.text_encoder_lr or optimizer.learning_rate / 2:g}"
        if lora.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
        "ss_lr_scheduler": optimizer.lr_scheduler,
        "ss_lr_warmup_steps": str(optimizer.warmup_steps),
        "ss_optimizer": optimizer.optimizer,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": f"{train.min_snr_gamma:g}",
        "ss_noise_offset": f"{train.noise_offset:g}",
        "ss_seed": str(train.seed),
        "ss_resolution": f"({facts.resolution}, {facts.resolution})",
        "ss_enable_bucket": str(config.data.bucketing),
        "ss_caption_dropout_rate": f"{config.data.caption_dropout:g}",
        "ss_shuffle_caption": str(config.data.shuffle_tags),
        "ss_keep_tokens": str(config.data.keep_tokens),
        "ss_num_train_images": str(facts.image_count),
        "ss_tag_frequency": metadata_json(facts.tag_frequency),
        "ss_session_id": facts.session_id,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": name if step == facts.steps else f"{name} (step {step})",
        "modelspec.date": date,
        "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
        "modelspec.prediction_type": {"v_prediction": "v"}.get(facts.prediction_type, facts.prediction_type),
        "modelspec.trigger_phrase": triggers,
        "lora_lab.format_version": FORMAT_VERSION,
        "lora_lab.trigger_words": metadata_json(list(facts.trigger_words)),
        "lora_lab.step": str(step),
        "lora_lab.dataset_fingerprint": facts.dataset_fingerprint,
        "lora_lab.config": metadata_json(config.shareable()),
        **({"lora_lab.resume_history": metadata_json(list(facts.resume_history))} if facts.resume_history else {}),
        **facts.started_from,
        **story(config, facts, step, checkpoint),
        **facts.graph,  # "workflow" and "prompt": ComfyUI's frontend opens them from a dropped file
    }
