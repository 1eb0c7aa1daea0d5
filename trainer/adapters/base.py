"""What every adapter type provides (one subclass per module in trainer/adapters/): its PEFT
config (PEFT injects every type; DoRA's layer is PEFT's LoRA layer with LyCORIS's decomposition),
the trainable tensors of an adapted layer by role, those tensors as file keys (the layout
ComfyUI's weight_adapter, A1111/Forge and kohya tools read) and back, the check of a layer's keys
in a file header, and the kohya metadata that names the type.

A role is what PEFT calls the layer's parameter ("lora_A", "hada_w1_a", "lokr_w1"); LyCORIS files
use the same names as key suffixes, LoRA files use kohya's or diffusers' (family.lora_suffixes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

ADAPTER_NAME = "lora_lab"  # PEFT's adapter name: a model holds exactly one trainable adapter


class Adapter:
    name: ClassVar[str]
    title: ClassVar[str]
    network_module: ClassVar[str]  # ss_network_module, as kohya and LyCORIS write it
    layer_class: ClassVar[type]  # PEFT's layer type
    # Every key suffix a file of this type may hold for a layer (besides "alpha"): how the header
    # check tells the types apart (expected_suffixes says which a model layer needs).
    file_suffixes: ClassVar[tuple[str, ...]]
    # The type whose keys this one adds to (DoRA: LoRA's halves plus dora_scale): a layer holding
    # both types' keys is of this one.
    extends: ClassVar[str | None] = None

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], exclude_modules: str | None,
                    options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def roles(self, layer: Any) -> list[tuple[str, torch.nn.Parameter]]:
        """The layer's trainable tensors by role (stable names: resume files use them)."""
        return [(role, getattr(layer, role)[ADAPTER_NAME]) for role in layer.adapter_layer_names
                if ADAPTER_NAME in getattr(layer, role)]

    def export(self, layer: Any, family: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's tensors as file key suffixes, alpha included."""
        raise NotImplementedError

    def load_pairs(self, layer: Any, found: dict[str, torch.Tensor], family: Any) -> list[tuple[Any, torch.Tensor]]:
        """(parameter, file tensor) pairs that load a file's tensors (by key suffix) into the layer."""
        return [(parameter, found[role]) for role, parameter in self.roles(layer)]

    def load_alpha(self, layer: Any, found: dict[str, torch.Tensor]) -> None:
        """Set the layer's alpha from the file (after its tensors are in) and its strength to 1."""
        raise NotImplementedError

    def expected_suffixes(self, layer: Any, family: Any) -> tuple[str, ...]:
        """The key suffixes a file must hold for this model layer (besides alpha)."""
        raise NotImplementedError

    def check_layer(self, shapes: dict[str, list[int]]) -> str | None:
        """What is wrong with one layer's keys in a file header (suffix -> shape), or None."""
        raise NotImplementedError

    def network_args(self, options: dict[str, Any]) -> dict[str, str]:
        """ss_network_args beyond the targets, as the type's reference trainer writes them."""
        return {}

    def our_suffix(self, suffix: str, family: Any) -> str:
        """The key suffix this family's files give what another tool's file calls `suffix`."""
        return suffix

    def rank_of(self, shapes: dict[str, list[int]]) -> int | None:
        """The rank of one layer of a file (suffix -> shape), or None where its keys do not say."""
        raise NotImplementedError

    def options_of(self, layers: list[dict[str, list[int]]]) -> dict[str, Any]:
        """The type's own settings (e.g. lokr_factor) that a file's layers were made with."""
        return {}

    def build_hints(self, layers: list[dict[str, list[int]]]) -> dict[str, Any]:
        """What peft_config needs beyond the settings to rebuild a file's layers exactly."""
        return {}

    def start_problem(self, shapes: dict[str, list[int]]) -> str | None:
        """Why a run cannot train on from one layer of a file that loaders read fine, or None."""
        return None


class LycorisAdapter(Adapter):
    """A LyCORIS type (PEFT's LoHa, LoKr): file key suffixes are PEFT's role names, as LyCORIS
    writes them, and `.alpha` scales by alpha / rank as in PEFT and ComfyUI."""

    network_module = "lycoris.kohya"

    def export(self, layer: Any, family: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {role: parameter.detach().to("cpu", dtype).contiguous() for role, parameter in self.roles(layer)}
        tensors["alpha"] = torch.tensor(float(layer.alpha[ADAPTER_NAME]), dtype=torch.float32)
        return tensors

    def expected_suffixes(self, layer: Any, family: Any) -> tuple[str, ...]:
        return tuple(role for role, _ in self.roles(layer))

    def load_alpha(self, layer: Any, found: dict[str, torch.Tensor]) -> None:
        alpha = found.get("alpha")
        layer.alpha[ADAPTER_NAME] = float(alpha) if alpha is not None else float(layer.r[ADAPTER_NAME])
        layer.set_scale(ADAPTER_NAME, 1.0)

    def network_args(self, options: dict[str, Any]) -> dict[str, str]:
        return {"algo": self.name}
