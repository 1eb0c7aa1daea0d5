"""The trained adapter on a loaded model, through PEFT, whatever its type (trainer/adapters/: LoRA,
LoHa, LoKr): add it, list its layers and parameters, and set its strength.

All adapters carry one name, so a model holds exactly one trainable adapter; strengths are PEFT's
per-layer scaling (strength · alpha / rank), the same maths ComfyUI applies to a saved file.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import inject_adapter_in_model

from .adapters import adapter_of_layer, get_adapter
from .adapters.base import ADAPTER_NAME
from .errors import LoraLabError
from .families.base import LoadedModel

ADAPTER = ADAPTER_NAME


def add_lora(model: LoadedModel, rank: int, alpha: float, targets: str, train_text_encoder: bool,
             adapter: str = "lora", modules: dict[str, list[str]] | None = None, **options: Any) -> None:
    """Freeze the base model and add an adapter of type `adapter` (trainer/adapters/; `options` are
    its own settings, e.g. lokr_factor); it starts as a no-op, so the model starts unchanged.
    `modules` (export prefix -> module paths: a starting file's layers, trainer/init_lora.py) names
    the layers exactly, in place of the targets."""
    family, kind = model.family, get_adapter(adapter)
    for module in (model.denoiser, *model.encoders.modules()):
        module.requires_grad_(False)
    if modules is not None:
        jobs = [(module, modules[prefix]) for prefix, module in model.lora_modules() if modules.get(prefix)]
    else:
        jobs = [(model.denoiser, family.targets(targets))]
        if train_text_encoder:
            jobs += [(encoder, list(family.text_encoder_targets)) for encoder in model.text_encoders]
    for module, target_modules in jobs:
        excluded = family.excluded_modules if module is model.denoiser and modules is None else None
        config = kind.peft_config(rank, alpha, target_modules, excluded, options)
        try:
            # inject_adapter_in_model works for diffusers and transformers modules alike (transformers
            # 5.x's own add_adapter refuses current peft releases).
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:
            raise LoraLabError(f"targets = {targets!r} matched no layer of the {family.name} model "
                               f"({error}). Use one of {', '.join(family.target_sets)} or module name endings that "
                               "exist.") from None
    for parameter in lora_parameters(model):
        parameter.data = parameter.data.float()  # adapter weights train in fp32 even over a half-precision base
        parameter.requires_grad_(True)


def lora_layers(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """The module's adapted layers (of any adapter type) with their paths."""
    return [(name, layer) for name, layer in module.named_modules() if _adapted(layer)]


def _adapted(layer: torch.nn.Module) -> bool:
    names = getattr(layer, "adapter_layer_names", None)
    return bool(names) and any(ADAPTER in getattr(layer, role, ()) for role in names)


def lora_parameters(model: LoadedModel, denoiser_only: bool = False) -> list[torch.nn.Parameter]:
    denoiser = f"{model.family.denoiser_prefix}."
    return [p for name, p in named_lora_parameters(model) if not denoiser_only or name.startswith(denoiser)]


def named_lora_parameters(model: LoadedModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable adapter parameters with stable names (denoiser first, then each text encoder)."""
    return [(f"{prefix}.{path}.{role}", p) for prefix, module in model.lora_modules()
            for path, layer in lora_layers(module)
            for role, p in adapter_of_layer(layer).roles(layer)]


def set_strength(model: LoadedModel, strength: float) -> None:
    """Scale the adapter's effect: 0 is the base model, 1 the adapter as trained."""
    for _, module in model.lora_modules():
        for _, layer in lora_layers(module):
            layer.set_scale(ADAPTER, strength)
