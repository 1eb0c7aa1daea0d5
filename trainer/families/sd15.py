"""Stable Diffusion 1.5: UNet2DConditionModel + AutoencoderKL + one CLIP-L text encoder.

Loads a diffusers folder (the embedded tiny model is one) or an original-format single-file
checkpoint, offline, with the configs shipped in `configs/sd15`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ..errors import LoraLabError
from .base import LoadedModel, ModelFamily, read_model_index, read_safetensors_header

CONFIGS = Path(__file__).parent / "configs"

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_MLP = ("ff.net.0.proj", "ff.net.2")


class StableDiffusionFamily(ModelFamily):
    name = "sd15"
    default_resolution = 512
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"
    denoiser_prefix = "lora_unet"
    text_encoder_prefixes = ("lora_te",)
    target_sets = {"attention": UNET_ATTENTION, "attention_mlp": UNET_ATTENTION + UNET_MLP}
    pipeline_class: Any = StableDiffusionPipeline

    # --- loading ---------------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, config_dir: str = "") -> LoadedModel:
        path = Path(source).expanduser()
        if path.is_dir():
            parts = self._load_folder(path, dtype)
        elif path.is_file():
            parts = self._load_single_file(path, dtype, Path(config_dir) if config_dir else CONFIGS / self.name)
        else:
            raise LoraLabError(f"Base model {path} does not exist; give a diffusers folder or a .safetensors "
                               "checkpoint file.")
        scheduler = DDPMScheduler.from_config(parts.pop("scheduler").config)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        return LoadedModel(family=self, noise_scheduler=scheduler, prediction_type=prediction_type,
                           source=str(path), **parts)

    def _load_folder(self, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
        index = read_model_index(folder)
        expected = self.pipeline_class.__name__
        if index.get("_class_name") not in (expected, expected.replace("Pipeline", "Img2ImgPipeline")):
            raise LoraLabError(f"{folder} holds a {index.get('_class_name')} model, not {self.name} "
                               f"({expected}); choose the matching family or another model.")
        # A folder without a safety checker still lists one in its index; say so, or diffusers warns.
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = self.pipeline_class.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
        return self._parts(pipe)

    def _load_single_file(self, path: Path, dtype: torch.dtype, config_dir: Path) -> dict[str, Any]:
        from . import detect_family

        found = detect_family(read_safetensors_header(path))
        if found != self.name:
            raise LoraLabError(f"{path.name} looks like a {found} model, not {self.name}; set family to {found} "
                               "or choose a matching checkpoint.")
        if not (config_dir / "model_index.json").is_file():
            raise LoraLabError(f"model_config {config_dir} is not a diffusers config folder (no model_index.json).")
        pipe = self.pipeline_class.from_single_file(str(path), config=str(config_dir), dtype=dtype,
                                                    local_files_only=True, **self._tokenizers(config_dir))
        return self._parts(pipe)

    def _tokenizers(self, config_dir: Path) -> dict[str, Any]:
        """Tokenizers a config folder lacks, from the one CLIP tokenizer shipped (SDXL's second one
        pads with "!", as OpenCLIP does)."""
        from transformers import CLIPTokenizer

        names = [name for name in ("tokenizer", "tokenizer_2") if name in read_model_index(config_dir)]
        shipped = CONFIGS / "sd15" / "tokenizer"
        return {name: CLIPTokenizer.from_pretrained(shipped, **({"pad_token": "!"} if name == "tokenizer_2" else {}))
                for name in names if not (config_dir / name).is_dir()}

    def _parts(self, pipe: Any) -> dict[str, Any]:
        return {"denoiser": pipe.unet, "vae": pipe.vae, "text_encoders": [pipe.text_encoder],
                "tokenizers": [pipe.tokenizer], "scheduler": pipe.scheduler}

    # --- encoding and prediction ------------------------------------------------------------
    def encode_prompts(self, model: LoadedModel, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(model.device)
        return {"prompt_embeds": encoder(ids)[0]}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample

    def pipeline(self, model: LoadedModel) -> Any:
        return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                       tokenizer=model.tokenizers[0], unet=model.denoiser,
                                       scheduler=self.sampling_scheduler(model), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def sampling_scheduler(self, model: LoadedModel) -> Any:
        return EulerDiscreteScheduler.from_config(model.noise_scheduler.config,
                                                  prediction_type=model.prediction_type)

    def pixel_multiple(self, model: LoadedModel) -> int:
        return self.vae_factor(model) * 2 ** (len(model.denoiser.config.block_out_channels) - 1)

