"""FLUX.1-dev: FluxTransformer2DModel + a 16-channel AutoencoderKL + CLIP-L (pooled) and T5 (sequence).

The transformer works on packed latents (2x2 patches as tokens, with their row and column as
image ids), takes the flow time σ directly and, being guidance-distilled, a guidance value. The
objective is rectified flow (see objectives.py). LoRA files use diffusers/PEFT names with a
`transformer.` prefix and an `.alpha` per layer, which ComfyUI, Forge and diffusers all map.

Loads a diffusers folder, or a transformer-only single file (original BFL layout, as ComfyUI's
models/diffusion_models holds it, or diffusers layout) with `model_config` naming a FLUX diffusers
folder for the VAE, text encoders and tokenizers (dit.py).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ..errors import LoraLabError
from . import flux_layout
from .base import FamilyEncoders, LoadedModel
from .dit import TransformerFamily, count_blocks

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
T5_MAX_TOKENS = 512  # FLUX.1-dev's text length
# diffusers names of the transformer layers ComfyUI maps (comfy/lora.py: every weight of its
# flux_to_diffusers table under `transformer.`; the final modulation, stored reordered, is left out).
LAYERS = (r"transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
          r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
          r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)|x_embedder"
          r"|context_embedder|proj_out|time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12])")


class FluxFamily(TransformerFamily):
    name = "flux"
    title = "FLUX.1-dev"
    default_resolution = 1024
    base_model_version = "flux1"
    architecture = "flux-1-dev/lora"
    pipeline_classes = ("FluxPipeline",)
    pipeline_class = FluxPipeline
    pooled_conditioning = "pooled_projections"
    text_tokens = 256
    # As ComfyUI's own FLUX example loads and samples it.
    comfy_text_encoders = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
    comfy_clip_type = "flux"
    comfy_vae = "ae.safetensors"
    unsupported_reason = "FLUX trains with rectified flow, and its LoRA trains the transformer only"
    target_sets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP}
    excluded_modules = r"proj_out"  # the final layer shares the single blocks' "proj_out" ending
    layer_patterns = (LAYERS,)

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        # FLUX.2 shares FLUX.1's block names; its global modulation tells it apart.
        flux2 = any("double_stream_modulation_img." in key for key in shapes)
        return not flux2 and any(key.endswith(("double_blocks.0.img_attn.qkv.weight",
                                               "transformer_blocks.0.attn.add_q_proj.weight")) for key in shapes)

    def training_scheduler(self) -> Any:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    # --- loading ---------------------------------------------------------------------------
    def pipeline_class_transformer(self) -> Any:
        return FluxTransformer2DModel

    def pipeline_text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def pipeline_tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer, pipe.tokenizer_2]

    def to_diffusers_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state if "x_embedder.weight" in state else flux_layout.to_diffusers(state)

    def config_from_state(self, state: dict[str, torch.Tensor], config: dict[str, Any],
                          file_name: str) -> dict[str, Any]:
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        if sum(config.get("axes_dims_rope", (16, 56, 56))) != head_dim:
            raise LoraLabError(f"{file_name} has {head_dim}-wide attention heads; set model_config to a folder whose "
                               "transformer/config.json gives axes_dims_rope summing to that.")
        return {**config, "num_layers": count_blocks(state, "transformer_blocks"),
                "num_single_layers": count_blocks(state, "single_transformer_blocks"),
                "in_channels": state["x_embedder.weight"].shape[1], "attention_head_dim": head_dim,
                "num_attention_heads": state["x_embedder.weight"].shape[0] // head_dim,
                "joint_attention_dim": state["context_embedder.weight"].shape[1],
                "pooled_projection_dim": state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
                "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state}

    # --- encoding and prediction ------------------------------------------------------------
    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        (clip_tokenizer, t5_tokenizer), (clip, t5) = encoders.tokenizers, encoders.text_encoders
        clip_ids = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(encoders.device)
        length = min(T5_MAX_TOKENS, t5_tokenizer.model_max_length)
        t5_ids = t5_tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids.to(encoders.device)
        return {"prompt_embeds": t5(t5_ids)[0], "pooled_projections": clip(clip_ids).pooler_output}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        packed = (noisy.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
                  .reshape(batch, (height // 2) * (width // 2), channels * 4))
        image_ids = torch.zeros(height // 2, width // 2, 3, device=noisy.device, dtype=noisy.dtype)
        image_ids[..., 1] += torch.arange(height // 2, device=noisy.device, dtype=noisy.dtype)[:, None]
        image_ids[..., 2] += torch.arange(width // 2, device=noisy.device, dtype=noisy.dtype)[None, :]
        text = conditioning["prompt_embeds"]
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if model.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), model.guidance, device=noisy.device, dtype=torch.float32)
        output = model.denoiser(hidden_states=packed, timestep=timesteps.to(noisy.dtype), guidance=guidance,
                                pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=text,
                                txt_ids=text_ids, img_ids=image_ids.reshape(-1, 3), return_dict=False)[0]
        return (output.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
                .reshape(batch, channels, height, width))

    def pipeline(self, model: LoadedModel) -> Any:
        encoders = self.own_encoders(model)
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
                            vae=encoders.vae, text_encoder=encoders.text_encoders[0], tokenizer=encoders.tokenizers[0],
                            text_encoder_2=encoders.text_encoders[1], tokenizer_2=encoders.tokenizers[1],
                            transformer=model.denoiser)

    def latent_channels(self, model: LoadedModel) -> int:
        return model.denoiser.config.in_channels // 4  # 2x2 patches of the VAE's channels

    def uses_classifier_free_guidance(self, model: LoadedModel) -> bool:
        return not model.denoiser.config.guidance_embeds
