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
from .base import (
    FamilyEncoders,
    LoadedModel,
    ModelFamily,
    ModelIdentity,
    read_model_index,
    read_safetensors_header,
)

CONFIGS = Path(__file__).parent / "configs"

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_MLP = ("ff.net.0.proj", "ff.net.2")
# kohya names of the UNet layers ComfyUI maps (comfy/lora.py maps every weight of its
# unet_to_diffusers table; SDXL's add_embedding is missing there under that name, so it is not here).
UNET_LAYERS = (r"lora_unet_(((down|up)_blocks_\d+|mid_block)_(attentions_\d+_(proj_in|proj_out|transformer_blocks_\d+_"
               r"(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))|resnets_\d+_(conv1|conv2|time_emb_proj"
               r"|conv_shortcut)|(downsamplers|upsamplers)_0_conv)|conv_in|conv_out|time_embedding_linear_[12])")
CLIP_LAYERS = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"


def is_sdxl_checkpoint(keys) -> bool:
    return any(key.startswith(("conditioner.embedders.1", "model.diffusion_model.label_emb")) for key in keys)


class StableDiffusionFamily(ModelFamily):
    name = "sd15"
    title = "SD 1.5"
    default_resolution = 512
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    caption_style = "tags"
    unsupported_settings = ("flow_shift", "train_guidance")
    unsupported_reason = "they belong to the flow-matching families' objective (FLUX.1, Z-Image, FLUX.2)"
    denoiser_prefix = "lora_unet"
    text_encoder_prefixes = ("lora_te",)
    target_sets = {"attention": UNET_ATTENTION, "attention_mlp": UNET_ATTENTION + UNET_MLP}
    layer_patterns = (UNET_LAYERS, rf"lora_te_{CLIP_LAYERS}")
    pipeline_class: Any = StableDiffusionPipeline

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        # The width of the UNet's cross-attention keys is the text conditioning width: 768 for SD 1.x.
        cross_attention = [key for key in shapes if key.startswith("model.diffusion_model.")
                           and key.endswith(".attn2.to_k.weight")]
        if not cross_attention or is_sdxl_checkpoint(shapes):
            return False
        if shapes[cross_attention[0]][-1] == 1024:
            raise LoraLabError("This checkpoint's UNet takes 1024-wide text conditioning: it is a Stable Diffusion "
                               "2.x model, which LoRA Lab does not train. Use an SD 1.5, SDXL or FLUX.1-dev "
                               "checkpoint.")
        return True  # the SD 1.x layout (768-wide for real SD 1.5; smaller for test models)

    def training_scheduler(self) -> Any:
        # The scaled-linear betas SD 1.x and SDXL were trained with (ComfyUI samples with the same).
        return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             num_train_timesteps=1000, clip_sample=False)

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
        encoders = FamilyEncoders(self, parts["vae"], parts["text_encoders"], parts["tokenizers"])
        return LoadedModel(family=self, denoiser=parts["denoiser"], encoders=encoders, noise_scheduler=scheduler,
                           prediction_type=scheduler.config.get("prediction_type", "epsilon"),
                           identity=ModelIdentity.of_path(path),
                           resolution=self.native_resolution(parts["denoiser"], encoders))

    def _load_folder(self, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
        index = read_model_index(folder)
        if index.get("_class_name") not in self.pipeline_classes:
            raise LoraLabError(f"{folder} holds a {index.get('_class_name')} model, not {self.title} "
                               f"({self.pipeline_classes[0]}); choose the matching family or another model.")
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
    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = encoders.tokenizers[0], encoders.text_encoders[0]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoders.device)
        return {"prompt_embeds": encoder(ids)[0]}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample

    def pipeline(self, model: LoadedModel) -> Any:
        encoders = self.own_encoders(model)
        return StableDiffusionPipeline(vae=encoders.vae, text_encoder=encoders.text_encoders[0],
                                       tokenizer=encoders.tokenizers[0], unet=model.denoiser,
                                       scheduler=self.sampling_scheduler(model), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def sampling_scheduler(self, model: LoadedModel) -> Any:
        return EulerDiscreteScheduler.from_config(model.noise_scheduler.config,
                                                  prediction_type=model.prediction_type)

    def pixel_multiple(self, model: LoadedModel) -> int:
        return model.encoders.pixels_per_latent() * 2 ** (len(model.denoiser.config.block_out_channels) - 1)

