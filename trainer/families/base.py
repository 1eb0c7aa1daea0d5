"""The model-family interface: everything the training loop, the exporter and the sampler need
to know about one kind of base model, and nothing the loop itself decides.

A family says how to load a model, which modules get LoRA, how to encode prompts and images,
how to run the denoiser, how the exported keys are named and what metadata identifies the base.
The noise/target/weighting maths lives in `objectives.py` and is shared by all families.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from ..errors import LoraLabError


@dataclass(frozen=True)
class ModelIdentity:
    """Which base model a run trains: a name people recognise (recorded in the LoRA's metadata as
    `ss_sd_model_name`), and a key that changes whenever the weights change (cached encodings
    are filed under it, so two different models never share them)."""

    name: str
    key: str

    @classmethod
    def of_path(cls, path: Path) -> ModelIdentity:
        """A file or diffusers folder, keyed by its path and the size and time of every file in it."""
        path = path.expanduser().resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamps = [f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in files]
        return cls(name=path.name, key=hashlib.sha256("|".join([str(path), *stamps]).encode()).hexdigest())


class Encoders:
    """What turns captions into text conditioning and images into latents. Two kinds: the model's
    own VAE and text encoders (`FamilyEncoders`), or those of a ComfyUI graph (nodes/), so that
    the conditioning trained on is exactly what that graph samples with."""

    def __init__(self, text_encoders: list[torch.nn.Module] | None = None) -> None:
        # Text encoders that text-encoder LoRA can train, in the order of the family's export prefixes.
        self.text_encoders = list(text_encoders or [])

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions; every tensor's first dimension is the batch."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents, scaled as the denoiser expects them, for (B, 3, H, W) images in [-1, 1]."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of encode_images: (B, 3, H, W) images in [-1, 1]."""
        raise NotImplementedError

    def pixels_per_latent(self) -> int:
        """Image pixels per latent along a side (8 for the SD, SDXL and FLUX VAEs)."""
        return 8

    def place(self, device: torch.device, keep_decoder: bool = False) -> None:
        """Move the encoders (to the CPU once their outputs are cached, and back to sample); with
        `keep_decoder` the VAE stays where it is, to decode samples while training."""

    def modules(self) -> list[torch.nn.Module]:
        """Every module whose weights count towards the model's memory."""
        return []


class FamilyEncoders(Encoders):
    """The base model's own VAE, text encoders and tokenizers, driven as its family says."""

    def __init__(self, family: ModelFamily, vae: torch.nn.Module, text_encoders: list[torch.nn.Module],
                 tokenizers: list[Any]) -> None:
        super().__init__(text_encoders)
        self.family, self.vae, self.tokenizers = family, vae, tokenizers

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.family.encode_prompts(self, captions)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.family.vae_encode(self.vae, pixels)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.vae_decode(self.vae, latents)

    def pixels_per_latent(self) -> int:
        return self.family.vae_pixels_per_latent(self.vae)

    def place(self, device: torch.device, keep_decoder: bool = False) -> None:
        for module in self.text_encoders if keep_decoder else self.modules():
            module.to(device)

    def modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]

    @property
    def device(self) -> torch.device:
        """Where the text encoders run (prompts are tokenized onto it)."""
        return next(self.text_encoders[0].parameters()).device


@dataclass
class LoadedModel:
    """A base model ready to train: its denoiser, its encoders, and the family that knows how to
    drive them."""

    family: ModelFamily
    denoiser: torch.nn.Module
    encoders: Encoders
    noise_scheduler: Any
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    identity: ModelIdentity
    resolution: int  # the image size the base model was made for
    guidance: float = 1.0  # the distilled-guidance value guidance-distilled models (FLUX.1-dev) train with
    # The names ComfyUI's files give the denoiser's weights (diffusers key -> "diffusion_model.<original
    # key>"), where the model came from ComfyUI (nodes/graph_model.py): how a file saved by ComfyUI's own
    # training nodes is read (trainer/init_lora.py).
    original_names: dict[str, str] = field(default_factory=dict)
    # Tensors of a starting file that are not trained but kept (trainer/init_lora.py): written into
    # every checkpoint unchanged, under the file's own key names.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.encoders.text_encoders

    def flow_shift(self, latent_size: tuple[int, int], setting: float = 0.0) -> float:
        """The σ shift of the flow objective for latents of this size: the flow_shift setting's
        when it gives one, else the family's own."""
        return setting or self.family.flow_shift(self, latent_size)

    def lora_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(export prefix, module) for the denoiser and each text encoder."""
        prefixes = self.family.text_encoder_prefixes
        # zip is not strict: a model trained with outside encoders (ComfyUI's CLIP) holds none.
        return [(self.family.denoiser_prefix, self.denoiser), *zip(prefixes, self.text_encoders, strict=False)]


class ModelFamily:
    """Base class of the families. Everything that differs between kinds of base model is a class
    attribute or method here, so the loop, the exporter, the nodes and the settings never name a
    family: they ask it."""

    name: ClassVar[str]
    title: ClassVar[str]  # as users say it: "SD 1.5"
    default_resolution: ClassVar[int]  # the guide: "Match your base model (512 or 1024)"
    base_model_version: ClassVar[str]  # kohya ss_base_model_version
    architecture: ClassVar[str]  # modelspec.architecture
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers pipelines (model_index.json) of this family
    caption_style: ClassVar[str]  # the guide's "Quick Caption Guide": "tags", "mixed" or "natural"
    # How a ComfyUI graph's CLIP output becomes this family's conditioning: the name of the pooled
    # vector (None: not used) and how many tokens of the sequence are kept, so every caption's
    # conditioning has one shape (77 for CLIP; 256 for FLUX's T5, the length ComfyUI pads to).
    pooled_conditioning: ClassVar[str | None] = None
    text_tokens: ClassVar[int] = 77
    # How ComfyUI users hold this family's files (the graph a LoRA trained from the command line
    # opens, trainer/workflow.py): one checkpoint, or a diffusion model with these text encoder
    # files (loaded as `comfy_clip_type`) and VAE file; and the scheduler its graphs sample with.
    comfy_text_encoders: ClassVar[tuple[str, ...]] = ()
    comfy_clip_type: ClassVar[str] = ""
    comfy_vae: ClassVar[str] = ""
    comfy_scheduler: ClassVar[str] = "normal"
    # Settings that mean nothing for this family: refused unless left at their defaults.
    unsupported_settings: ClassVar[tuple[str, ...]] = ()
    unsupported_reason: ClassVar[str] = ""
    denoiser_prefix: ClassVar[str]
    text_encoder_prefixes: ClassVar[tuple[str, ...]]
    # How diffusers' save_lora_weights names the denoiser and each text encoder (a file to start from).
    diffusers_prefixes: ClassVar[tuple[str, ...]] = ("unet", "text_encoder", "text_encoder_2")
    # Named sets of denoiser module-name endings that get LoRA; "attention" is the default.
    target_sets: ClassVar[dict[str, tuple[str, ...]]]
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # Latent pixels per denoiser token along a side (flow families: the token count sets the shift).
    latent_patch: ClassVar[int] = 2
    # Linear layers fp8_base leaves in the compute dtype (a regex on the full name): those whose
    # weight dtype the model reads to choose what its input is cast to.
    fp8_kept: ClassVar[str | None] = None
    # Modules never given LoRA although a target ending matches them (a regex on the full name).
    excluded_modules: ClassVar[str | None] = None
    # How LoRA files name layers: "kohya" (`lora_unet_down_blocks_0_..` + lora_down/lora_up) or
    # "peft" (`transformer.transformer_blocks.0.attn.to_q` + lora_A/lora_B); with `.alpha` (but see below).
    key_style: ClassVar[str] = "kohya"
    # False where a loader this family's users rely on refuses `.alpha` keys (diffusers' FLUX.2 loader):
    # a LoRA's alpha / rank is then multiplied into its up half and no alpha is written, as ai-toolkit
    # writes them; every loader applies the same change (without an alpha they scale by 1).
    lora_alpha_in_file: ClassVar[bool] = True
    # Every layer name this family's LoRA files may hold: the names ComfyUI's LoraLoader maps for
    # it (comfy/lora.py), which A1111/Forge and diffusers read too. A layer outside them would be
    # dropped with "lora key not loaded", so such a LoRA is refused before training starts.
    layer_patterns: ClassVar[tuple[str, ...]]

    # --- what the family is --------------------------------------------------------------------
    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether an original-format checkpoint (tensor names and shapes) is of this family."""
        raise NotImplementedError

    def training_scheduler(self) -> Any:
        """The noise schedule the family was trained with, for a model given without one (a
        ComfyUI graph's)."""
        raise NotImplementedError

    def native_resolution(self, denoiser: torch.nn.Module, encoders: Encoders) -> int:
        """The image size a denoiser was made for: its latent sample size where its config has one
        (the embedded tiny model's is 64 px), else the family's."""
        sample_size = getattr(denoiser.config, "sample_size", None)
        if isinstance(sample_size, int):
            return sample_size * encoders.pixels_per_latent()
        return self.default_resolution

    # --- the flow objective -------------------------------------------------------------------
    def latent_tokens(self, latent_size: tuple[int, int]) -> int:
        height, width = latent_size
        return (height // self.latent_patch) * (width // self.latent_patch)

    def flow_shift(self, model: LoadedModel, latent_size: tuple[int, int]) -> float:
        """The timestep shift training draws σ with, by default the one the model's own scheduler
        samples with at this image size: a fixed shift, or with dynamic shifting exp(μ), μ linear
        in the token count between the scheduler's base and max shifts (FLUX.1-dev: 3.16 at 1024 px,
        kohya's recommended value)."""
        config = model.noise_scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base + (top - base) * (self.latent_tokens(latent_size) - low) / (high - low)
        return math.exp(mu)

    def sampling_mu(self, model: LoadedModel, latent_size: tuple[int, int], steps: int) -> float:
        """μ of the sampling schedule, for schedulers with dynamic shifting."""
        return math.log(self.flow_shift(model, latent_size))

    # --- loading, encoding, predicting ---------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, config_dir: str = "") -> LoadedModel:
        """Load a diffusers folder or a single-file checkpoint (read with the configs in
        `config_dir`, or those shipped for the family)."""
        raise NotImplementedError

    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions; every tensor's first dimension is the batch."""
        raise NotImplementedError

    def vae_encode(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The model's own VAE's latents for (B, 3, H, W) images in [-1, 1], scaled as the denoiser
        expects them (its config's shift and scaling factors)."""
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def vae_decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        shift = vae.config.get("shift_factor") or 0.0
        return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample

    def vae_pixels_per_latent(self, vae: Any) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def text_rows(self, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-caption (1, L, D) text sequences (a ComfyUI CLIP's) as this family's conditioning
        rows, one shape for every caption: the first `text_tokens` of each."""
        return {"prompt_embeds": torch.cat([sequence[:, :self.text_tokens] for sequence in sequences])}

    def measured_text(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning the memory estimate measures a step with (on the meta device, where
        values are gone): as it is, for families whose rows all have one length."""
        return conditioning

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

    def latent_channels(self, model: LoadedModel) -> int:
        """Channels of the latents the denoiser works on (before any packing)."""
        return model.denoiser.config.in_channels

    def uses_classifier_free_guidance(self, model: LoadedModel) -> bool:
        """False for guidance-distilled models (FLUX.1-dev), which take the guidance as an input."""
        return True

    @staticmethod
    def own_encoders(model: LoadedModel) -> FamilyEncoders:
        """The model's own VAE and text encoders, which a diffusers pipeline needs."""
        if not isinstance(model.encoders, FamilyEncoders):
            raise LoraLabError("This model was given without its own VAE and text encoders (a ComfyUI graph's "
                               "are used); sample it through ComfyUI (Sample Checkpoint) instead.")
        return model.encoders

    # --- LoRA layers and their names in files --------------------------------------------------
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
        name = f"{prefix}_{path.replace('.', '_')}" if self.key_style == "kohya" else f"{prefix}.{path}"
        if not any(re.fullmatch(pattern, name) for pattern in self.layer_patterns):
            raise LoraLabError(f"LoRA layer {name} is not one that ComfyUI's LoraLoader (or A1111/Forge) maps for "
                               f"{self.title}, so it would be dropped when the LoRA is loaded; nothing was written. "
                               f"Choose targets {' or '.join(self.target_sets)}, or module name endings of "
                               "attention, feed-forward or convolution layers.")
        return name

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
