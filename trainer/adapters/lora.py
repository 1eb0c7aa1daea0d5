"""Plain LoRA (PEFT's LoraConfig): ΔW = (alpha / rank) · up @ down. Files in kohya's layout
(`<layer>.lora_down.weight / .lora_up.weight / .alpha`) or, for the families whose readers expect
it (FLUX), diffusers' (`.lora_A.weight / .lora_B.weight / .alpha`)."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .base import ADAPTER_NAME, Adapter

MAX_RANK = 4096


class Lora(Adapter):
    name = "lora"
    title = "LoRA"
    network_module = "networks.lora"
    layer_class = LoraLayer
    file_suffixes = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight")

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], exclude_modules: str | None,
                    options: dict[str, Any]) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True,
                          exclude_modules=exclude_modules)

    def roles(self, layer: Any) -> list[tuple[str, torch.nn.Parameter]]:
        return [("lora_A", layer.lora_A[ADAPTER_NAME].weight), ("lora_B", layer.lora_B[ADAPTER_NAME].weight)]

    def export(self, layer: Any, family: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        down, up = family.lora_suffixes
        alpha = float(layer.lora_alpha[ADAPTER_NAME])
        up_weight = layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", torch.float32)
        if not family.lora_alpha_in_file:  # alpha / rank moves into the up half; read back, alpha = rank
            return {down: layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", dtype).contiguous(),
                    up: (up_weight * (alpha / layer.r[ADAPTER_NAME])).to(dtype).contiguous()}
        return {down: layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", dtype).contiguous(),
                up: up_weight.to(dtype).contiguous(), "alpha": torch.tensor(alpha, dtype=torch.float32)}

    def load_pairs(self, layer: Any, found: dict[str, torch.Tensor], family: Any) -> list[tuple[Any, torch.Tensor]]:
        down, up = family.lora_suffixes
        return [(layer.lora_A[ADAPTER_NAME].weight, found[down]), (layer.lora_B[ADAPTER_NAME].weight, found[up])]

    def load_alpha(self, layer: Any, found: dict[str, torch.Tensor]) -> None:
        alpha = found.get("alpha")
        layer.lora_alpha[ADAPTER_NAME] = float(alpha) if alpha is not None else float(layer.r[ADAPTER_NAME])
        layer.set_scale(ADAPTER_NAME, 1.0)

    def expected_suffixes(self, layer: Any, family: Any) -> tuple[str, ...]:
        return family.lora_suffixes

    def check_layer(self, shapes: dict[str, list[int]]) -> str | None:
        down = shapes.get("lora_down.weight", shapes.get("lora_A.weight"))
        up = shapes.get("lora_up.weight", shapes.get("lora_B.weight"))
        if down is None or up is None:
            return "has only one of its two halves"
        if len(down) not in (2, 4) or len(up) not in (2, 4) or down[0] != up[1]:
            return f"has halves that do not fit together ({down} and {up})"
        if not 1 <= down[0] <= MAX_RANK:
            return f"has rank {down[0]}"
        return None

    def our_suffix(self, suffix: str, family: Any) -> str:
        down, up = family.lora_suffixes
        return {"lora_down.weight": down, "lora_A.weight": down, "lora_up.weight": up, "lora_B.weight": up}[suffix]

    def rank_of(self, shapes: dict[str, list[int]]) -> int | None:
        return shapes.get("lora_down.weight", shapes.get("lora_A.weight"))[0]


ADAPTER = Lora()
