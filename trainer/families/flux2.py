"""FLUX.2 [klein] (4B and 9B, base and distilled): Flux2Transformer2DModel + FLUX.2's 32-channel
AutoencoderKLFlux2 + Qwen3 (4B for Klein 4B, 8B for Klein 9B) as the text encoder; flow matching.

How the family's own code drives it (black-forest-labs/flux2's sampling and text encoder, diffusers'
Flux2KleinPipeline and ComfyUI's comfy/text_encoders/flux.py agree):
- latents: the VAE's 32 channels at 1/8 are folded 2x2 into 128 channels at 1/16 and normalised by
  the VAE's own batch-norm statistics (`vae.bn`); the transformer takes each latent pixel as a
  token (patch size 1), with (0, row, column, 0) as its position.
- a caption goes through Qwen3's chat template (the assistant's turn opened with an empty thinking
  block), padded to 512 tokens; the conditioning is hidden states 9, 18 and 27 of Qwen3's 36
  layers side by side (a quarter, a half and three quarters of the depth: how a smaller test
  encoder is read too), padding kept, positions (0, 0, 0, token).
- the transformer takes σ and predicts the velocity noise - x0 directly.
- Klein has no guidance embedding: the base models sample with classifier-free guidance (about 4,
  50 steps), the distilled ones at guidance 1 and 4 steps. BFL: "Base ... for fine-tuning, LoRA
  training", so train a base model.

Training defaults and where they come from:
- resolution 1024 (diffusers' Flux2KleinPipeline default_sample_size 128 x 8; ComfyUI's template).
- timestep shift exp(μ), μ linear in the token count from 0.5 at 256 to 1.15 at 4096 tokens (3.16
  at 1024 px): the scheduler's own base/max shift, musubi-tuner's `flux2_shift` sampling
  (docs/flux_2.md: "recommended for FLUX.2"). Samples use BFL's empirical μ (sampling.py,
  compute_empirical_mu), as the pipelines and ComfyUI's Flux2Scheduler do.
- LoRA on the double blocks' attention (and with attention_mlp their feed-forward) and the single
  blocks' fused projections, not the shared modulation or the embedders (musubi-tuner's
  networks/lora_flux_2.py excludes the modulation).
- captions in natural language (BFL's prompting guide).

LoRA files use diffusers names under `transformer.`, their alpha / rank multiplied into the up half
and no `.alpha` (diffusers' FLUX.2 loader refuses those keys; ai-toolkit writes its FLUX.2 LoRAs so):
ComfyUI's LoraLoader maps them onto its fused layers (comfy/lora.py, flux_to_diffusers: FLUX.2's
single-block names from ComfyUI 0.10, its feed-forward names from 0.11).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

from ..errors import LoraLabError
from .base import FamilyEncoders, LoadedModel
from .dit import TransformerFamily, count_blocks
from .zimage import chat_prompt

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj", "attn.to_out")
MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
TEXT_TOKENS = 512  # BFL's MAX_LENGTH; every caption is padded to it
LAYERS = (r"transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
          r"|to_add_out)|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
          r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)|x_embedder|context_embedder|proj_out"
          r"|norm_out\.linear)")


class Flux2KleinFamily(TransformerFamily):
    name = "flux2"
    title = "FLUX.2 [klein]"
    default_resolution = 1024
    base_model_version = "flux2_klein"
    architecture = "flux-2-klein/lora"
    pipeline_classes = ("Flux2KleinPipeline",)
    pipeline_class = Flux2KleinPipeline
    text_tokens = TEXT_TOKENS
    latent_patch = 1  # the latents are already 2x2-folded: one token per latent pixel
    # As ComfyUI's own FLUX.2 Klein 4B template loads it (Comfy-Org/flux2-klein split_files).
    comfy_text_encoders = ("qwen_3_4b.safetensors",)
    comfy_clip_type = "flux2"
    comfy_vae = "flux2-vae.safetensors"
    unsupported_settings = (*TransformerFamily.unsupported_settings, "train_guidance")
    unsupported_reason = ("FLUX.2 [klein] trains with flow matching, has no guidance input, and its LoRA trains "
                          "the transformer only")
    target_sets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP}
    # "attn.to_out" names the single blocks' output layer; in a double block it is a list holding to_out.0.
    excluded_modules = r"transformer_blocks\.\d+\.attn\.to_out"
    layer_patterns = (LAYERS,)
    lora_alpha_in_file = False  # diffusers' Flux2LoraLoaderMixin refuses `.alpha` keys (0.42)

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return any("double_stream_modulation_img." in key for key in shapes)

    def training_scheduler(self) -> Any:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    def sampling_mu(self, model: LoadedModel, latent_size: tuple[int, int], steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(self.latent_tokens(latent_size), steps)

    # --- loading ---------------------------------------------------------------------------
    def pipeline_class_transformer(self) -> Any:
        return Flux2Transformer2DModel

    def to_diffusers_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {key.removeprefix("model.diffusion_model."): value for key, value in state.items()}
        if "img_in.weight" in state:  # BFL's and ComfyUI's layout
            from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

            state = convert_flux2_transformer_checkpoint_to_diffusers(state)
        return state

    def config_from_state(self, state: dict[str, torch.Tensor], config: dict[str, Any],
                          file_name: str) -> dict[str, Any]:
        if "x_embedder.weight" not in state or "context_embedder.weight" not in state:
            raise LoraLabError(f"{file_name} has no image or text embedder; is it a complete FLUX.2 transformer file?")
        width, channels = state["x_embedder.weight"].shape
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        return {**config, "in_channels": channels, "attention_head_dim": head_dim,
                "num_attention_heads": width // head_dim, "num_layers": count_blocks(state, "transformer_blocks"),
                "num_single_layers": count_blocks(state, "single_transformer_blocks"),
                "joint_attention_dim": state["context_embedder.weight"].shape[1],
                "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in state}

    # --- latents ----------------------------------------------------------------------------
    def vae_encode(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        batch, channels, height, width = latents.shape
        folded = (latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
                  .reshape(batch, channels * 4, height // 2, width // 2))
        mean, std = _batch_norm_stats(vae, folded)
        return (folded - mean) / std

    def vae_decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.device, vae.dtype)
        mean, std = _batch_norm_stats(vae, latents)
        latents = latents * std + mean
        batch, channels, height, width = latents.shape
        unfolded = (latents.view(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
                    .reshape(batch, channels // 4, height * 2, width * 2))
        return vae.decode(unfolded).sample

    def vae_pixels_per_latent(self, vae: Any) -> int:
        return 2 ** len(vae.config.block_out_channels)  # the VAE's 1/8, then the 2x2 fold

    # --- encoding and prediction ------------------------------------------------------------
    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        (tokenizer,), (encoder,) = encoders.tokenizers, encoders.text_encoders
        texts = [chat_prompt(tokenizer, caption, thinking=False) for caption in captions]
        tokens = tokenizer(texts, padding="max_length", max_length=self.text_tokens, truncation=True,
                           return_tensors="pt").to(encoders.device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True,
                         use_cache=False).hidden_states
        depth = len(hidden) - 1  # hidden_states[0] is the embeddings
        return {"prompt_embeds": torch.cat([hidden[depth * k // 4] for k in (1, 2, 3)], dim=-1)}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        tokens = noisy.reshape(batch, channels, height * width).permute(0, 2, 1)
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        zero = torch.zeros(height * width, dtype=torch.long)
        image_ids = torch.stack([zero, rows.reshape(-1), columns.reshape(-1), zero], dim=-1).to(noisy.device)
        text = conditioning["prompt_embeds"]
        text_ids = torch.zeros(text.shape[1], 4, dtype=torch.long, device=noisy.device)
        text_ids[:, 3] = torch.arange(text.shape[1], device=noisy.device)
        guidance = None
        if model.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), model.guidance, device=noisy.device, dtype=torch.float32)
        output = model.denoiser(hidden_states=tokens, encoder_hidden_states=text, timestep=timesteps.to(noisy.dtype),
                                img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        return output.permute(0, 2, 1).reshape(batch, channels, height, width)

    def pipeline(self, model: LoadedModel) -> Any:
        encoders = self.own_encoders(model)
        return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
                                  vae=encoders.vae, text_encoder=encoders.text_encoders[0],
                                  tokenizer=encoders.tokenizers[0], transformer=model.denoiser)

    def uses_classifier_free_guidance(self, model: LoadedModel) -> bool:
        return not model.denoiser.config.guidance_embeds


def _batch_norm_stats(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's own latent statistics (mean, std), shaped to broadcast over (B, 128, H, W)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std
