"""The model-family interface: everything the training loop, the exporter and the sampler need
to know about one kind of base model, and nothing the loop itself decides.

A family says how to load a model, which modules get LoRA, how to encode prompts and images,
how to run the denoiser, how the exported keys are named and what metadata identifies the base.
The noise/target/weighting maths lives in `objectives.py` and is shared by all families.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from ..errors import LoraLabError


@dataclass
class LoadedModel:
    """A base model ready to train: its parts, and the family that knows how to drive them."""

    family: ModelFamily
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    source: str  # what was loaded, for metadata and cache keys
    guidance: float = 1.0  # the distilled-guidance value guidance-distilled models (FLUX.1-dev) train with
    # Replace the family's encoders, e.g. with a ComfyUI graph's own CLIP and VAE, so the
    # conditioning trained on is exactly what that graph will sample with.
    prompt_encoder: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is not None:
            return self.prompt_encoder(captions)
        return self.family.encode_prompts(self, captions)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.image_encoder is not None:
            return self.image_encoder(pixels)
        return self.family.encode_images(self, pixels)

    def place_encoders(self, device: torch.device) -> None:
        """Move the VAE and text encoders (e.g. to the CPU once their outputs are cached, and back
        to sample). A no-op where outside encoders (ComfyUI's) do the encoding."""
        for module in (self.vae, *self.text_encoders):
            if module is not None:
                module.to(device)

    def lora_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(export prefix, module) for the denoiser and each text encoder."""
        prefixes = self.family.text_encoder_prefixes
        # zip is not strict: a model trained with outside encoders (ComfyUI's CLIP) holds none.
        return [(self.family.denoiser_prefix, self.denoiser), *zip(prefixes, self.text_encoders, strict=False)]


class ModelFamily:
    """Base class of the families; each subclass fills in the class attributes and methods."""

    name: ClassVar[str]
    default_resolution: ClassVar[int]
    base_model_version: ClassVar[str]  # kohya ss_base_model_version
    architecture: ClassVar[str]  # modelspec.architecture
    denoiser_prefix: ClassVar[str]
    text_encoder_prefixes: ClassVar[tuple[str, ...]]
    # Named sets of denoiser module-name endings that get LoRA; "attention" is the default.
    target_sets: ClassVar[dict[str, tuple[str, ...]]]
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # Modules never given LoRA although a target ending matches them (a regex on the full name).
    excluded_modules: ClassVar[str | None] = None
    # How LoRA files name layers: "kohya" (`lora_unet_down_blocks_0_..` + lora_down/lora_up) or
    # "peft" (`transformer.transformer_blocks.0.attn.to_q` + lora_A/lora_B); always with `.alpha`.
    key_style: ClassVar[str] = "kohya"

    def load(self, source: str, dtype: torch.dtype, config_dir: str = "") -> LoadedModel:
        """Load a diffusers folder or a single-file checkpoint (read with the configs in
        `config_dir`, or those shipped for the family)."""
        raise NotImplementedError

    def encode_prompts(self, model: LoadedModel, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions; every tensor's first dimension is the batch."""
        raise NotImplementedError

    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents for a batch of (B, 3, H, W) images in [-1, 1] (the distribution's mode,
        shifted and scaled as the VAE's config says)."""
        vae = model.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def image_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           target_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per-image conditioning beyond the latents (SDXL's size and crop ids); none by default."""
        return {}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self, model: LoadedModel) -> Any:
        """A diffusers pipeline over the same modules, for sampling."""
        raise NotImplementedError

    def pixel_multiple(self, model: LoadedModel) -> int:
        """Image sides must be multiples of this (VAE factor × denoiser downsampling)."""
        raise NotImplementedError

    @staticmethod
    def vae_factor(model: LoadedModel) -> int:
        """Pixels per latent along a side. Without a diffusers VAE (ComfyUI's own VAE encodes), the
        factor 8 that SD, SDXL and FLUX VAEs share."""
        return 2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae is not None else 8

    def export_path(self, prefix: str, module_path: str) -> str:
        """A module's path as other tools name it. transformers 5 dropped the `text_model.` level
        of CLIP text encoders, but kohya names (and ComfyUI) keep it."""
        if prefix in self.text_encoder_prefixes and not module_path.startswith("text_model."):
            return f"text_model.{module_path}"
        return module_path

    @property
    def lora_suffixes(self) -> tuple[str, str]:
        """The (down, up) weight suffixes of this family's LoRA files."""
        return ("lora_down.weight", "lora_up.weight") if self.key_style == "kohya" else ("lora_A.weight",
                                                                                         "lora_B.weight")

    def layer_name(self, prefix: str, module_path: str) -> str:
        """A LoRA layer's name in files, as ComfyUI, diffusers and A1111/Forge read it for this family."""
        path = self.export_path(prefix, module_path)
        if not _SAFE_PATH.match(path):
            raise LoraLabError(f"Cannot name LoRA layer {path!r} (unexpected characters); nothing was written. "
                               "Please report this model.")
        return f"{prefix}_{path.replace('.', '_')}" if self.key_style == "kohya" else f"{prefix}.{path}"

    def targets(self, spec: str) -> list[str]:
        """Module-name endings for a named target set or a comma list of endings."""
        if spec in self.target_sets:
            return list(self.target_sets[spec])
        endings = [part.strip() for part in spec.split(",") if part.strip()]
        if not endings:
            raise LoraLabError(f"targets = {spec!r} names no layers; use one of {', '.join(self.target_sets)} "
                               "or a comma list of module name endings such as to_q,to_v.")
        return endings


_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.]+$")


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file without reading its tensors, or a clear
    error when it is not one (wrong format, truncated download)."""
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise LoraLabError(f"{path.name} is a pickle-based checkpoint, which can run code when loaded and is "
                           "never opened here. Use the .safetensors version of the model (most model pages "
                           "offer one).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for the same problem
        raise LoraLabError(f"{path} is not a readable .safetensors file ({error}). If it was downloaded, the "
                           "download may be incomplete: download it again.") from None


def read_model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise LoraLabError(f"{folder} is not a diffusers model folder (no model_index.json). Point base_model at "
                           "a diffusers folder or a single-file .safetensors checkpoint.")
    return json.loads(index.read_text(encoding="utf-8"))
