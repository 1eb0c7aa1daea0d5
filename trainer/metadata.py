"""The metadata written into every LoRA file: kohya `ss_*` keys (read by A1111/Forge, civitai and
other tools), Stability's `modelspec.*` keys, trigger words, and our full training config."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .config import TrainingConfig
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


def new_session_id() -> str:
    return uuid.uuid4().hex


def build_metadata(config: TrainingConfig, facts: RunFacts, step: int) -> dict[str, str]:
    family = facts.family
    lora, optimizer, train = config.lora, config.optimizer, config.train
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    triggers = ", ".join(facts.trigger_words)
    name = config.output.name
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_args": metadata_json({"targets": lora.targets}),
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
        "ss_num_train_images": str(facts.image_count),
        "ss_tag_frequency": metadata_json(facts.tag_frequency),
        "ss_session_id": facts.session_id,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
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
    }
