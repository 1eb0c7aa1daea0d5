"""LoRA files: keys and metadata, written atomically, and read back strictly.

Keys are named as each family's readers expect (ModelFamily.layer_name): for SD 1.5 and SDXL
kohya's `<prefix>_<module path with dots as underscores>.lora_down.weight / .lora_up.weight /
.alpha` (prefix `lora_unet`, `lora_te1`, ...); for FLUX `transformer.<module path>.lora_A.weight
/ .lora_B.weight / .alpha`. ComfyUI's LoraLoader, A1111/Forge and diffusers read both.

The exporter is strict: a layer it cannot name uniquely raises before anything is written, and
the true alpha is always written (a file whose alpha silently equals
its rank would change the LoRA's effect whenever they differ).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LoraLabError
from .families.base import LoadedModel
from .files import atomic_write
from .lora import ADAPTER, LoraLayer, lora_layers
from .lora_files import check_lora

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def named_layers(model: LoadedModel) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer of the model with its name in files; raises if two would share a name."""
    named: dict[str, LoraLayer] = {}
    for prefix, module in model.lora_modules():
        for path, layer in lora_layers(module):
            name = model.family.layer_name(prefix, path)
            if name in named:
                raise LoraLabError(f"Two LoRA layers would share the name {name}; nothing was written. "
                                   "Please report this model.")
            named[name] = layer
    return list(named.items())


def lora_state_dict(model: LoadedModel, alpha: float, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The LoRA as kohya-named tensors. Raises before returning anything if a layer cannot be named."""
    tensors: dict[str, torch.Tensor] = {}
    down, up = model.family.lora_suffixes
    for name, layer in named_layers(model):
        tensors[f"{name}.{down}"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.{up}"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not tensors:
        raise LoraLabError("The model has no LoRA layers to save; nothing was written.")
    return tensors


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_into_model(model: LoadedModel, path: Path) -> None:
    """Put a saved LoRA file's weights and alphas into the model's adapter. The file must match
    the adapter layer for layer; it is checked whole before anything is changed."""
    check_lora(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise LoraLabError(f"{path} is not a readable LoRA .safetensors file ({error}).") from None
    updates, expected = [], set()
    down_suffix, up_suffix = model.family.lora_suffixes
    for name, layer in named_layers(model):
        expected.update(f"{name}.{suffix}" for suffix in (down_suffix, up_suffix, "alpha"))
        try:
            down, up = tensors[f"{name}.{down_suffix}"], tensors[f"{name}.{up_suffix}"]
        except KeyError:
            raise LoraLabError(f"{path.name} has no weights for layer {name}: it was trained with other "
                               "targets or on another model.") from None
        for target, source in ((layer.lora_A[ADAPTER].weight, down), (layer.lora_B[ADAPTER].weight, up)):
            if target.shape != source.shape:
                raise LoraLabError(f"{path.name}: layer {name} has shape {tuple(source.shape)}, the model "
                                   f"expects {tuple(target.shape)} (another rank or base model).")
        alpha = tensors.get(f"{name}.alpha")
        updates.append((layer, down, up, float(alpha) if alpha is not None else float(down.shape[0])))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise LoraLabError(f"{path.name} has {len(unexpected)} layers this model's adapter lacks "
                           f"(e.g. {unexpected[0]}): it was trained with other targets or on another model.")
    with torch.no_grad():
        for layer, down, up, alpha in updates:
            layer.lora_A[ADAPTER].weight.copy_(down)
            layer.lora_B[ADAPTER].weight.copy_(up)
            layer.lora_alpha[ADAPTER] = alpha
            layer.set_scale(ADAPTER, 1.0)

