"""The registry of model families and detection of a checkpoint's family from its tensor names."""

from __future__ import annotations

from ..errors import LoraLabError
from .base import LoadedModel, ModelFamily
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


__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "detect_family", "get_family"]
