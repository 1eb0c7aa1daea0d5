"""LoRA files: keys and metadata, written atomically, and read back strictly.

Layers are named as each family's readers expect (ModelFamily.layer_name): for SD 1.5 and SDXL
kohya's `<prefix>_<module path with dots as underscores>` (prefix `lora_unet`, `lora_te1`, ...),
for FLUX `transformer.<module path>`. What each layer holds is the adapter type's
(trainer/adapters/): `.lora_down.weight / .lora_up.weight / .alpha` for a LoRA (`.lora_A.weight /
.lora_B.weight` for FLUX), LyCORIS's `.hada_w1_a ...` for LoHa, `.lokr_w1 ...` for LoKr. ComfyUI's
LoraLoader and A1111/Forge read them all; diffusers reads the LoRAs.

The exporter is strict: a layer it cannot name uniquely raises before anything is written, and
the true alpha is always written (a file whose alpha silently equals its rank would change the
LoRA's effect whenever they differ), or, for a family whose loaders refuse alphas (FLUX.2), it is
multiplied into the LoRA's up half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .adapters import adapter_of_layer
from .errors import LoraLabError
from .families.base import LoadedModel
from .files import atomic_write
from .lora import lora_layers
from .lora_files import check_lora

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def named_layers(model: LoadedModel) -> list[tuple[str, Any]]:
    """Every adapted layer of the model with its name in files; raises if two would share a name."""
    named: dict[str, Any] = {}
    for prefix, module in model.lora_modules():
        for path, layer in lora_layers(module):
            name = model.family.layer_name(prefix, path)
            if name in named:
                raise LoraLabError(f"Two LoRA layers would share the name {name}; nothing was written. "
                                   "Please report this model.")
            named[name] = layer
    return list(named.items())


def lora_state_dict(model: LoadedModel, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The adapter as named tensors. Raises before returning anything if a layer cannot be named."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in named_layers(model):
        for suffix, tensor in adapter_of_layer(layer).export(layer, model.family, dtype).items():
            tensors[f"{name}.{suffix}"] = tensor
    if not tensors:
        raise LoraLabError("The model has no LoRA layers to save; nothing was written.")
    return {**tensors, **model.carried}


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_into_model(model: LoadedModel, path: Path) -> None:
    """Put a saved file's tensors and alphas into the model's adapter. The file must match the
    adapter layer for layer (its type, targets and shapes); it is checked whole before anything
    is changed."""
    check_lora(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise LoraLabError(f"{path} is not a readable LoRA .safetensors file ({error}).") from None
    load_tensors(model, tensors, path.name)


def load_tensors(model: LoadedModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put named adapter tensors (as `lora_state_dict` names them) into the model's adapter, all
    checked before any is changed. A convolution's halves written flattened to 2-D (ComfyUI's
    training nodes do) are taken in the layer's own shape: the product is the same."""
    updates, expected = [], set(model.carried)
    for name, layer in named_layers(model):
        adapter = adapter_of_layer(layer)
        suffixes = adapter.expected_suffixes(layer, model.family)
        expected.update(f"{name}.{suffix}" for suffix in (*suffixes, "alpha"))
        missing = [suffix for suffix in suffixes if f"{name}.{suffix}" not in tensors]
        if missing:
            raise LoraLabError(f"{source} has no {missing[0]} for layer {name}: it was trained as another "
                               f"adapter type (this run trains {adapter.title}), with other targets or on another "
                               "model.")
        found = {suffix: tensors[key] for suffix in (*suffixes, "alpha") if (key := f"{name}.{suffix}") in tensors}
        pairs = []
        for target, value in adapter.load_pairs(layer, found, model.family):
            if target.shape != value.shape and _flattened(value.shape, target.shape):
                value = value.reshape(target.shape)
            if target.shape != value.shape:
                raise LoraLabError(f"{source}: layer {name} has a tensor of shape {tuple(value.shape)}, the "
                                   f"model expects {tuple(target.shape)} (another rank, factor or base model).")
            pairs.append((target, value))
        updates.append((adapter, layer, found, pairs))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise LoraLabError(f"{source} has {len(unexpected)} tensors this model's adapter lacks "
                           f"(e.g. {unexpected[0]}): it was trained as another adapter type, with other targets or "
                           "on another model.")
    with torch.no_grad():
        for adapter, layer, found, pairs in updates:
            for target, value in pairs:
                target.copy_(value)
            adapter.load_alpha(layer, found)


def _flattened(shape: torch.Size, target: torch.Size) -> bool:
    """Whether `shape` is `target` with its trailing dimensions folded into one (or unfolded: a
    1x1 convolution's half written as a matrix)."""
    return shape[0] == target[0] and shape.numel() == target.numel() and (len(shape) == 2 or len(target) == 2)
