"""LoRA adapters on a loaded model, through PEFT: add them, list their parameters, set their
strength, and load saved weights back into them.

All adapters carry one name, so a model holds exactly one trainable LoRA; strengths are PEFT's
per-layer scaling (strength · alpha / rank), the same maths ComfyUI applies to a saved file.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from .errors import LoraLabError
from .families.base import LoadedModel

ADAPTER = "lora_lab"


def add_lora(model: LoadedModel, rank: int, alpha: float, targets: str, train_text_encoder: bool) -> None:
    """Freeze the base model and add a LoRA (A random, B zero: the model starts unchanged)."""
    family = model.family
    for module in (model.denoiser, *model.encoders.modules()):
        module.requires_grad_(False)
    jobs = [(model.denoiser, family.targets(targets))]
    if train_text_encoder:
        jobs += [(encoder, list(family.text_encoder_targets)) for encoder in model.text_encoders]
    for module, target_modules in jobs:
        excluded = family.excluded_modules if module is model.denoiser else None
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True,
                            exclude_modules=excluded)
        try:
            # inject_adapter_in_model works for diffusers and transformers modules alike (transformers
            # 5.x's own add_adapter refuses current peft releases).
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:
            raise LoraLabError(f"targets = {targets!r} matched no layer of the {family.name} model ({error}). "
                               f"Use one of {', '.join(family.target_sets)} or module name endings that exist."
                               ) from None
    for parameter in lora_parameters(model):
        parameter.data = parameter.data.float()  # LoRA weights train in fp32 even over a half-precision base
        parameter.requires_grad_(True)


def lora_layers(module: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, layer) for name, layer in module.named_modules()
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A]


def lora_parameters(model: LoadedModel, denoiser_only: bool = False) -> list[torch.nn.Parameter]:
    denoiser = f"{model.family.denoiser_prefix}."
    return [p for name, p in named_lora_parameters(model) if not denoiser_only or name.startswith(denoiser)]


def named_lora_parameters(model: LoadedModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA parameters with stable names (denoiser first, then each text encoder)."""
    return [(f"{prefix}.{path}.{kind}", p) for prefix, module in model.lora_modules()
            for path, layer in lora_layers(module)
            for kind, p in (("lora_A", layer.lora_A[ADAPTER].weight), ("lora_B", layer.lora_B[ADAPTER].weight))]


def set_strength(model: LoadedModel, strength: float) -> None:
    """Scale the LoRA's effect: 0 is the base model, 1 the LoRA as trained."""
    for _, module in model.lora_modules():
        for _, layer in lora_layers(module):
            layer.set_scale(ADAPTER, strength)
