"""What the diffusion-transformer families (FLUX.1, Z-Image, FLUX.2) share: loading a diffusers
folder or a transformer-only single file, the flow objective's timestep shift, and LoRA files in
diffusers/PEFT names under `transformer.`.

A transformer-only file is how ComfyUI's models/diffusion_models holds these models; its VAE, text
encoders and tokenizers then come from `model_config`, a diffusers folder of the same family (its
transformer weights are not read). A family says which pipeline class it is, how its file's
tensors become a diffusers transformer (`transformer_from_state`), and how it is packed into tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from ..errors import LoraLabError
from .base import FamilyEncoders, LoadedModel, ModelFamily, ModelIdentity, read_model_index, read_safetensors_header

CONFIGS = Path(__file__).parent / "configs"


class TransformerFamily(ModelFamily):
    """Base of the families whose denoiser is one diffusion transformer trained with flow matching."""

    pipeline_class: ClassVar[Any]
    unsupported_settings = ("min_snr_gamma", "prediction_type", "train_text_encoder", "text_encoder_lr")
    text_encoder_prefixes = ()
    diffusers_prefixes = ("transformer",)
    denoiser_prefix = "transformer"
    key_style = "peft"
    caption_style = "natural"
    comfy_scheduler = "simple"

    # --- loading ---------------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, config_dir: str = "") -> LoadedModel:
        path = Path(source).expanduser()
        if path.is_dir():
            index = read_model_index(path)
            if index.get("_class_name") not in self.pipeline_classes:
                raise LoraLabError(f"{path} holds a {index.get('_class_name')} model, not {self.title} "
                                   f"({' or '.join(self.pipeline_classes)}); choose the matching family or another "
                                   "model.")
            pipe = self.pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True)
        elif path.is_file():
            pipe = self._load_transformer_file(path, dtype, Path(config_dir) if config_dir else None)
        else:
            raise LoraLabError(f"Base model {path} does not exist; give a {self.title} diffusers folder or a "
                               f"{self.title} transformer .safetensors file.")
        encoders = FamilyEncoders(self, pipe.vae, self.pipeline_text_encoders(pipe), self.pipeline_tokenizers(pipe))
        return LoadedModel(family=self, denoiser=pipe.transformer, encoders=encoders,
                           noise_scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
                           prediction_type="flow", identity=ModelIdentity.of_path(path),
                           resolution=self.default_resolution)

    def pipeline_text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder]

    def pipeline_tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer]

    def _load_transformer_file(self, path: Path, dtype: torch.dtype, parts_folder: Path | None) -> Any:
        from . import detect_family

        found = detect_family(read_safetensors_header(path))
        if found != self.name:
            raise LoraLabError(f"{path.name} looks like a {found} model, not {self.title}; set family to {found}.")
        if parts_folder is None or not (parts_folder / "model_index.json").is_file():
            raise LoraLabError(f"{path.name} holds only the {self.title} transformer. Set model_config to a "
                               f"{self.title} diffusers folder for its VAE, text encoders and tokenizers (the "
                               "transformer weights there are not read), or train in ComfyUI, where Train LoRA "
                               "uses the graph's own CLIP and VAE.")
        transformer = self.transformer_from_file(path, dtype, parts_folder)
        return self.pipeline_class.from_pretrained(parts_folder, transformer=transformer, dtype=dtype,
                                                   local_files_only=True)

    def transformer_from_file(self, path: Path, dtype: torch.dtype, parts_folder: Path | None) -> torch.nn.Module:
        """A transformer from one file in the original or the diffusers layout. Block counts and
        widths come from the file; the rest of the config from `parts_folder` if it has one, else
        the shipped one (the family's published model)."""
        state = self.to_diffusers_layout(load_file(str(path)))
        has_config = parts_folder is not None and (parts_folder / "transformer").is_dir()
        config_folder = parts_folder if has_config else CONFIGS / self.name
        model_class = self.pipeline_class_transformer()
        config = self.config_from_state(state, dict(model_class.load_config(config_folder / "transformer")), path.name)
        with torch.device("meta"):
            transformer = model_class.from_config(config)
        for key in list(state):  # one tensor at a time, so the file's copy is freed as we go
            state[key] = state[key].to(dtype)
        try:
            transformer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise LoraLabError(f"{path.name} does not fit a {self.title} transformer "
                               f"({str(error).splitlines()[1][:200]}); is it a complete {self.title} transformer "
                               "file?") from None
        return transformer

    def pipeline_class_transformer(self) -> Any:
        """The diffusers transformer class of the pipeline."""
        raise NotImplementedError

    def to_diffusers_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A transformer file's tensors under diffusers' names (files in the original layout are converted)."""
        raise NotImplementedError

    def config_from_state(self, state: dict[str, torch.Tensor], config: dict[str, Any],
                          file_name: str) -> dict[str, Any]:
        """`config` with the values a file's tensors decide (block counts, widths)."""
        raise NotImplementedError

    def pixel_multiple(self, model: LoadedModel) -> int:
        return model.encoders.pixels_per_latent() * self.latent_patch


def count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix.N.` a state dict holds."""
    return len({key.split(".")[prefix.count(".") + 1] for key in state if key.startswith(prefix + ".")})
