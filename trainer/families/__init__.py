"""The registry of model families and detection of a checkpoint's family from its tensor names."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraLabError
from .base import LoadedModel, ModelFamily, read_model_index, read_safetensors_header
from .flux import FluxFamily
from .sd15 import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusionFamily(),
                                                                        StableDiffusionXLFamily(), FluxFamily())}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise LoraLabError(f"Model family {name!r} is not available; choose one of: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def detect_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """The family of an original-format checkpoint from its tensor names and shapes."""
    keys = shapes.keys()
    # The width of the UNet's cross-attention keys is the text conditioning width: 768 for SD 1.x.
    cross_attention = [key for key in keys if key.startswith("model.diffusion_model.")
                       and key.endswith(".attn2.to_k.weight")]
    if any(key.endswith(("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.add_q_proj.weight"))
           for key in keys):
        return "flux"
    if any(key.startswith(("conditioner.embedders.1", "model.diffusion_model.label_emb")) for key in keys):
        return "sdxl"
    if cross_attention:
        if shapes[cross_attention[0]][-1] == 1024:
            raise LoraLabError("This checkpoint's UNet takes 1024-wide text conditioning: it is a Stable Diffusion "
                               "2.x model, which LoRA Lab does not train. Use an SD 1.5, SDXL or FLUX.1-dev "
                               "checkpoint.")
        return "sd15"  # the SD 1.x layout (768-wide for real SD 1.5; smaller for test models)
    sample = ", ".join(list(keys)[:3]) or "no tensors at all"
    raise LoraLabError(f"Could not recognise this checkpoint as SD 1.5, SDXL or FLUX.1-dev (first tensors: {sample}). "
                       "Use a full original-format checkpoint of one of those, or a diffusers folder.")


PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionImg2ImgPipeline": "sd15",
                     "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
                     "FluxPipeline": "flux"}


def detect_source_family(source: Path) -> str:
    """The family of a diffusers folder (from its pipeline class) or a checkpoint file."""
    if source.is_dir():
        pipeline = read_model_index(source).get("_class_name")
        if pipeline not in PIPELINE_FAMILIES:
            raise LoraLabError(f"{source} holds a {pipeline} model; LoRA Lab trains SD 1.5, SDXL and FLUX.1-dev "
                               f"({', '.join(sorted(set(PIPELINE_FAMILIES)))}).")
        return PIPELINE_FAMILIES[pipeline]
    if not source.is_file():
        raise LoraLabError(f"Base model {source} does not exist; give a diffusers folder or a .safetensors "
                           "checkpoint file.")
    return detect_family(read_safetensors_header(source))


__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "detect_family", "detect_source_family", "get_family"]
