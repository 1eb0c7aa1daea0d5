"""DoRA (weight-decomposed LoRA, LyCORIS's `dora_wd`): a LoRA whose merged weight keeps a trained
magnitude per input column, W' = m · (W + ΔW) / ‖W + ΔW‖ with the norm over each column and
ΔW = (alpha / rank) · up @ down. Keys as LoRA's plus `<layer>.dora_scale`, shaped (1, in).

Why the input axis (LyCORIS's wd_on_output = False) and lycoris-lora rather than PEFT's use_dora:
PEFT decomposes along the output axis, which ComfyUI's weight_adapter applies with the base
weight's norm in place of the merged weight's (57% off PEFT's change, measured with ComfyUI's own
code in tests/test_comfyui_server.py), and A1111/Forge read the input axis only. ComfyUI, A1111
and LyCORIS all apply the input axis exactly, so the maths is LyCORIS's own (`weight_decompose`,
its reference implementation, which ComfyUI's loader follows); PEFT still injects the layers and
holds the two LoRA halves. Strength s is ComfyUI's: W + s · (W' − W), so 0 is the base exactly.

DoRA trains linear layers (attention and feed-forward projections, the text encoders'); a
convolution among the targets is refused with what to change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear

from ..errors import LoraLabError
from ..fp8 import dense_weight
from .base import ADAPTER_NAME
from .lora import Lora


def _decompose(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """LyCORIS's weight decomposition on the input axis (its eager form: the same on every device)."""
    from lycoris.functional.general import weight_decompose  # imported here: it takes seconds to load

    return weight_decompose(merged, magnitude, 1, wd_on_out=False, backend="torch")


class DoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear layer with LyCORIS's input-axis magnitude (`dora_scale`) on its merge."""

    adapter_layer_names = (*PeftLoraLinear.adapter_layer_names, "dora_scale")

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if "dora_scale" not in self._modules:  # PEFT's update_layer reads every adapter_layer_names entry
            self.dora_scale = torch.nn.ParameterDict()
            self.strength: dict[str, float] = {}
        # The column norms of the base weight, shaped (1, in): at the start W' = W, the base.
        norms = dense_weight(self.get_base_layer()).detach().float().norm(dim=0, keepdim=True)
        self.dora_scale[adapter_name] = torch.nn.Parameter(norms)
        self.strength[adapter_name] = 1.0
        super().update_layer(adapter_name, *args, **kwargs)

    def set_scale(self, adapter: str, scale: float) -> None:
        """The strength scales the decomposed change, as ComfyUI's loader does; alpha / rank stays."""
        super().set_scale(adapter, 1.0)
        self.strength[adapter] = scale

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        base = dense_weight(self.get_base_layer()).float()
        merged = base + (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) \
            * self.scaling[adapter]
        return self.strength[adapter] * (_decompose(merged, self.dora_scale[adapter].float()) - base)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or ADAPTER_NAME not in self.lora_A or self.merged:
            return result
        delta = self.get_delta_weight(ADAPTER_NAME)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)


class RefusedConvolution(torch.nn.Module):
    """Stands where PEFT would put a DoRA convolution: refuses, saying what to change."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        raise LoraLabError("adapter dora trains linear layers, and the targets include a convolution "
                           f"({type(base_layer).__name__} {tuple(base_layer.weight.shape)}). Leave convolutions out "
                           "of targets (the family's named sets have none), or use adapter lora, loha or lokr.")


class Dora(Lora):
    name = "dora"
    title = "DoRA"
    network_module = "lycoris.kohya"
    layer_class = DoraLinear
    file_suffixes = ("dora_scale",)  # beside a LoRA's halves (`extends`)
    extends = "lora"

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], exclude_modules: str | None,
                    options: dict[str, Any]) -> LoraConfig:
        try:
            import lycoris.functional.general  # noqa: F401 - only to know it is there, before any layer is built
        except ImportError:
            raise LoraLabError("adapter = dora needs the lycoris-lora package (LyCORIS's own DoRA maths): pip install "
                               "lycoris-lora (or use adapter lora).") from None
        config = super().peft_config(rank, alpha, target_modules, exclude_modules, options)
        config._register_custom_module({torch.nn.Linear: DoraLinear, torch.nn.Conv1d: RefusedConvolution,
                                        torch.nn.Conv2d: RefusedConvolution, torch.nn.Conv3d: RefusedConvolution})
        return config

    def roles(self, layer: Any) -> list[tuple[str, torch.nn.Parameter]]:
        return [*super().roles(layer), ("dora_scale", layer.dora_scale[ADAPTER_NAME])]

    def export(self, layer: Any, family: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        magnitude = layer.dora_scale[ADAPTER_NAME].detach().to("cpu", dtype).contiguous()
        return {**super().export(layer, family, dtype), "dora_scale": magnitude}

    def load_pairs(self, layer: Any, found: dict[str, torch.Tensor], family: Any) -> list[tuple[Any, torch.Tensor]]:
        return [*super().load_pairs(layer, found, family), (layer.dora_scale[ADAPTER_NAME], found["dora_scale"])]

    def expected_suffixes(self, layer: Any, family: Any) -> tuple[str, ...]:
        return (*super().expected_suffixes(layer, family), "dora_scale")

    def our_suffix(self, suffix: str, family: Any) -> str:
        return suffix if suffix == "dora_scale" else super().our_suffix(suffix, family)

    def check_layer(self, shapes: dict[str, list[int]]) -> str | None:
        problem = super().check_layer(shapes)
        if problem:
            return problem
        down, magnitude = shapes.get("lora_down.weight", shapes.get("lora_A.weight")), shapes["dora_scale"]
        up = shapes.get("lora_up.weight", shapes.get("lora_B.weight"))
        if [n for n in magnitude if n != 1] not in ([down[1]], [up[0]], []):  # either axis, as loaders read both
            return f"has a dora_scale of shape {magnitude} that fits neither of its weight's axes"
        return None

    def start_problem(self, shapes: dict[str, list[int]]) -> str | None:
        magnitude = shapes["dora_scale"]
        if not (len(magnitude) >= 2 and magnitude[0] == 1):
            return ("keeps its DoRA magnitude on the output axis (LyCORIS's default, or PEFT's use_dora), which "
                    "ComfyUI applies inexactly and A1111 not at all; LoRA Lab trains it on the input axis "
                    "(wd_on_output = False)")
        return None

    def network_args(self, options: dict[str, Any]) -> dict[str, str]:
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}


ADAPTER = Dora()
