"""LoHa (LyCORIS; PEFT's LoHaConfig): ΔW = (alpha / rank) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), a
Hadamard product of two low-rank matrices: rank r reaches rank r² for the same file size as a
LoRA of rank 2r. Keys `<layer>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b / alpha`, which
ComfyUI's weight_adapter (loha.py) reads with the same maths."""

from __future__ import annotations

from typing import Any

from peft import LoHaConfig
from peft.tuners.loha import LoHaLayer

from .base import LycorisAdapter

ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(LycorisAdapter):
    name = "loha"
    title = "LoHa"
    layer_class = LoHaLayer
    file_suffixes = (*ROLES, "hada_t1", "hada_t2")

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], exclude_modules: str | None,
                    options: dict[str, Any]) -> LoHaConfig:
        # init_weights: w2_b starts at zero, so the model starts unchanged, as a LoRA does.
        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_modules, exclude_modules=exclude_modules,
                          init_weights=True)

    def check_layer(self, shapes: dict[str, list[int]]) -> str | None:
        missing = [role for role in ROLES if role not in shapes]
        if missing:
            return f"lacks {', '.join(missing)}"
        w1_a, w1_b, w2_a, w2_b = (shapes[role] for role in ROLES)
        if any(len(shape) != 2 for shape in (w1_a, w1_b, w2_a, w2_b)) and "hada_t1" not in shapes:
            return "has LoHa factors that are not matrices"
        if w1_a[1] != w1_b[0] or w2_a[1] != w2_b[0] or w1_a[0] != w2_a[0] or w1_b[1:] != w2_b[1:]:
            return f"has LoHa factors that do not fit together ({w1_a}, {w1_b}, {w2_a}, {w2_b})"
        return None

    def rank_of(self, shapes: dict[str, list[int]]) -> int | None:
        return shapes["hada_w1_b"][0]


ADAPTER = LoHa()
