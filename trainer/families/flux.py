"""FLUX.1-dev: FluxTransformer2DModel + a 16-channel AutoencoderKL + CLIP-L (pooled) and T5 (sequence).

The transformer works on packed latents (2x2 patches as tokens, with their row and column as
image ids), takes the flow time σ directly and, being guidance-distilled, a guidance value. The
objective is rectified flow (see objectives.py). LoRA files use diffusers/PEFT names with a
`transformer.` prefix and an `.alpha` per layer, which ComfyUI, Forge and diffusers all map.

Loads a diffusers folder, or a transformer-only single file (original BFL layout, as ComfyUI's
models/diffusion_models holds it, or diffusers layout) with `model_config` naming a FLUX diffusers
folder for the VAE, text encoders and tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from ..errors import LoraLabError
from . import flux_layout
from .base import (
    FamilyEncoders,
    LoadedModel,
    ModelFamily,
    ModelIdentity,
    read_model_index,
    read_safetensors_header,
)

CONFIGS = Path(__file__).parent / "configs"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
T5_MAX_TOKENS = 512  # FLUX.1-dev's text length
# diffusers names of the transformer layers ComfyUI maps (comfy/lora.py: every weight of its
# flux_to_diffusers table under `transformer.`; the final modulation, stored reordered, is left out).
LAYERS = (r"transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
          r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
          r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)|x_embedder"
          r"|context_embedder|proj_out|time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12])")


class FluxFamily(ModelFamily):
    name = "flux"
    title = "FLUX.1-dev"
    default_resolution = 1024
    base_model_version = "flux1"
    architecture = "flux-1-dev/lora"
    pipeline_classes = ("FluxPipeline",)
    caption_style = "natural"
    pooled_conditioning = "pooled_projections"
    text_tokens = 256
    # As ComfyUI's own FLUX example loads and samples it.
    comfy_text_encoders = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
    comfy_clip_type = "flux"
    comfy_vae = "ae.safetensors"
    comfy_scheduler = "simple"
    unsupported_settings = ("min_snr_gamma", "prediction_type", "train_text_encoder", "text_encoder_lr")
    unsupported_reason = "FLUX trains with rectified flow, and its LoRA trains the transformer only"
    denoiser_prefix = "transformer"
    text_encoder_prefixes = ()
    diffusers_prefixes = ("transformer",)
    target_sets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP}
    excluded_modules = r"proj_out"  # the final layer shares the single blocks' "proj_out" ending
    key_style = "peft"
    layer_patterns = (LAYERS,)

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return any(key.endswith(("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.add_q_proj.weight"))
                   for key in shapes)

    def training_scheduler(self) -> Any:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    # --- loading ---------------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, config_dir: str = "") -> LoadedModel:
        path = Path(source).expanduser()
        if path.is_dir():
            index = read_model_index(path)
            if index.get("_class_name") != "FluxPipeline":
                raise LoraLabError(f"{path} holds a {index.get('_class_name')} model, not FLUX (FluxPipeline); "
                                   "choose the matching family or another model.")
            pipe = FluxPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        elif path.is_file():
            pipe = self._load_transformer_file(path, dtype, Path(config_dir) if config_dir else None)
        else:
            raise LoraLabError(f"Base model {path} does not exist; give a FLUX diffusers folder or a FLUX "
                               "transformer .safetensors file.")
        encoders = FamilyEncoders(self, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2],
                                  [pipe.tokenizer, pipe.tokenizer_2])
        return LoadedModel(family=self, denoiser=pipe.transformer, encoders=encoders,
                           noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
                           prediction_type="flow", identity=ModelIdentity.of_path(path),
                           resolution=self.default_resolution)

    def _load_transformer_file(self, path: Path, dtype: torch.dtype, parts_folder: Path | None) -> Any:
        from . import detect_family

        found = detect_family(read_safetensors_header(path))
        if found != self.name:
            raise LoraLabError(f"{path.name} looks like a {found} model, not FLUX; set family to {found}.")
        if parts_folder is None or not (parts_folder / "model_index.json").is_file():
            raise LoraLabError(f"{path.name} holds only the FLUX transformer. Set model_config to a FLUX.1-dev "
                               "diffusers folder for its VAE, text encoders and tokenizers (the transformer "
                               "weights there are not read), or train in ComfyUI, where Train LoRA uses the "
                               "graph's own CLIP and VAE.")
        transformer = self.transformer_from_file(path, dtype, parts_folder)
        return FluxPipeline.from_pretrained(parts_folder, transformer=transformer, dtype=dtype, local_files_only=True)

    def transformer_from_file(self, path: Path, dtype: torch.dtype, parts_folder: Path | None) -> Any:
        """A transformer from one file in the original (BFL) or diffusers layout. Block counts and
        widths come from the file; the rest of the config from `parts_folder` if it has one, else
        FLUX.1-dev's."""
        state = load_file(str(path))
        if "x_embedder.weight" not in state:
            state = flux_layout.to_diffusers(state)
        config_folder = parts_folder if parts_folder and (parts_folder / "transformer").is_dir() else CONFIGS / "flux"
        config = dict(FluxTransformer2DModel.load_config(config_folder / "transformer"))
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        config.update(
            num_layers=len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}),
            num_single_layers=len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")}),
            in_channels=state["x_embedder.weight"].shape[1], attention_head_dim=head_dim,
            num_attention_heads=state["x_embedder.weight"].shape[0] // head_dim,
            joint_attention_dim=state["context_embedder.weight"].shape[1],
            pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state)
        if sum(config.get("axes_dims_rope", (16, 56, 56))) != head_dim:
            raise LoraLabError(f"{path.name} has {head_dim}-wide attention heads; set model_config to a folder whose "
                               "transformer/config.json gives axes_dims_rope summing to that.")
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(config)
        for key in list(state):  # one tensor at a time, so the file's copy is freed as we go
            state[key] = state[key].to(dtype)
        try:
            transformer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise LoraLabError(f"{path.name} does not fit a FLUX transformer ({str(error).splitlines()[1][:200]}); "
                               "is it a complete FLUX.1 transformer file?") from None
        return transformer

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

    def pixel_multiple(self, model: LoadedModel) -> int:
        return model.encoders.pixels_per_latent() * 2  # latents are packed in 2x2 patches

    def latent_channels(self, model: LoadedModel) -> int:
        return model.denoiser.config.in_channels // 4  # 2x2 patches of the VAE's channels

    def uses_classifier_free_guidance(self, model: LoadedModel) -> bool:
        return not model.denoiser.config.guidance_embeds
