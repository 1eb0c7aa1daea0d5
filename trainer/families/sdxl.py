"""Stable Diffusion XL: UNet2DConditionModel with `text_time` added conditioning + AutoencoderKL +
two text encoders (CLIP-L and OpenCLIP-G, penultimate layers concatenated; pooled from G).

Loading, the objective and prediction types are SD 1.5's; what differs is the conditioning:
prompts give a 2048-wide sequence plus a 1280-wide pooled vector, and each image adds six
"time ids" (original size, crop corner, target size) that tell the UNet how it was cropped.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from .base import FamilyEncoders, LoadedModel
from .sd15 import CLIP_LAYERS, UNET_ATTENTION, UNET_LAYERS, UNET_MLP, StableDiffusionFamily, is_sdxl_checkpoint


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    title = "SDXL"
    default_resolution = 1024
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    caption_style = "mixed"
    pooled_conditioning = "text_embeds"
    denoiser_prefix = "lora_unet"
    text_encoder_prefixes = ("lora_te1", "lora_te2")
    target_sets = {"attention": UNET_ATTENTION, "attention_mlp": UNET_ATTENTION + UNET_MLP}
    layer_patterns = (UNET_LAYERS, rf"lora_te[12]_{CLIP_LAYERS}")
    pipeline_class: Any = StableDiffusionXLPipeline

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return is_sdxl_checkpoint(shapes)

    def _parts(self, pipe: Any) -> dict[str, Any]:
        return {"denoiser": pipe.unet, "vae": pipe.vae, "text_encoders": [pipe.text_encoder, pipe.text_encoder_2],
                "tokenizers": [pipe.tokenizer, pipe.tokenizer_2], "scheduler": pipe.scheduler}

    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        sequences, pooled = [], None
        for tokenizer, encoder in zip(encoders.tokenizers, encoders.text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoders.device)
            output = encoder(ids, output_hidden_states=True)
            sequences.append(output.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            pooled = output[0]  # the last encoder's projected pooled output (text_embeds)
        return {"prompt_embeds": torch.cat(sequences, dim=-1), "text_embeds": pooled}

    def image_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           target_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"time_ids": torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return model.denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
                              added_cond_kwargs=added).sample

    def pipeline(self, model: LoadedModel) -> Any:
        encoders = self.own_encoders(model)
        return StableDiffusionXLPipeline(vae=encoders.vae, text_encoder=encoders.text_encoders[0],
                                         text_encoder_2=encoders.text_encoders[1], tokenizer=encoders.tokenizers[0],
                                         tokenizer_2=encoders.tokenizers[1], unet=model.denoiser,
                                         scheduler=self.sampling_scheduler(model))
