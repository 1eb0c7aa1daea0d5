"""LoKr (LyCORIS; PEFT's LoKrConfig): ΔW = scale · w1 ⊗ w2, a Kronecker product of a small full
matrix w1 and a larger one w2 (itself low-rank, w2_a @ w2_b, unless the layer is small next to
the rank): far fewer parameters than a LoRA of the same reach. `lokr_factor` sets w1's size (-1:
as square as the layer allows, LyCORIS's and PEFT's default).

The scale: PEFT's is alpha / rank always. ComfyUI's weight_adapter (lokr.py), like LyCORIS, uses
alpha / rank only where a factor is low-rank and 1 where both are full matrices; so for such a
layer the exporter folds PEFT's scale into lokr_w1 (and writes alpha = rank), and loading takes
the folded factor as it is (scale 1): the file means what ComfyUI computes, exactly."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoKrConfig
from peft.tuners.lokr import LoKrLayer

from .base import ADAPTER_NAME, LycorisAdapter

FULL_FACTORS_RANK = 1 << 20  # above half of any layer's side


class LoKr(LycorisAdapter):
    name = "lokr"
    title = "LoKr"
    layer_class = LoKrLayer
    file_suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], exclude_modules: str | None,
                    options: dict[str, Any]) -> LoKrConfig:
        # init_weights: w1 starts at zero, so the model starts unchanged.
        rank = FULL_FACTORS_RANK if options.get("full_factors") else rank
        return LoKrConfig(r=rank, alpha=alpha, target_modules=target_modules, exclude_modules=exclude_modules,
                          decompose_factor=options.get("lokr_factor", -1), init_weights=True)

    @staticmethod
    def both_full(layer: Any) -> bool:
        return ADAPTER_NAME in layer.lokr_w1 and ADAPTER_NAME in layer.lokr_w2

    def export(self, layer: Any, family: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = super().export(layer, family, dtype)
        if self.both_full(layer):
            scale = float(layer.alpha[ADAPTER_NAME]) / float(layer.r[ADAPTER_NAME])
            w1 = layer.lokr_w1[ADAPTER_NAME].detach().float() * scale
            tensors["lokr_w1"] = w1.to("cpu", dtype).contiguous()
            tensors["alpha"] = torch.tensor(float(layer.r[ADAPTER_NAME]), dtype=torch.float32)
        return tensors

    def load_alpha(self, layer: Any, found: dict[str, torch.Tensor]) -> None:
        super().load_alpha(layer, found)
        if self.both_full(layer):  # the scale is in lokr_w1 (see above): ComfyUI and LyCORIS apply 1
            layer.alpha[ADAPTER_NAME] = float(layer.r[ADAPTER_NAME])
            layer.set_scale(ADAPTER_NAME, 1.0)

    def check_layer(self, shapes: dict[str, list[int]]) -> str | None:
        for factor in ("w1", "w2"):
            full, low = f"lokr_{factor}" in shapes, f"lokr_{factor}_a" in shapes and f"lokr_{factor}_b" in shapes
            if full == low:
                return f"needs either lokr_{factor} or both lokr_{factor}_a and lokr_{factor}_b"
        return None

    def network_args(self, options: dict[str, Any]) -> dict[str, str]:
        return {"algo": "lokr", "factor": str(options.get("lokr_factor", -1))}

    def rank_of(self, shapes: dict[str, list[int]]) -> int | None:
        # Only a low-rank factor has a rank; a layer of two full factors does not say.
        if "lokr_w2_a" in shapes:
            return shapes["lokr_w2_a"][1]
        return shapes["lokr_w1_a"][1] if "lokr_w1_a" in shapes else None

    def options_of(self, layers: list[dict[str, list[int]]]) -> dict[str, Any]:
        # The factor whose factorization gives every layer's w1 (PEFT's and LyCORIS's own function;
        # -1 is as square as each layer allows). The loader's shape check confirms it.
        from peft.tuners.lokr.layer import factorization

        sizes = []
        for shapes in layers:
            w1 = shapes.get("lokr_w1") or [shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1]]
            w2 = shapes.get("lokr_w2") or [shapes["lokr_w2_a"][0], *shapes["lokr_w2_b"][1:]]
            sizes.append((w1[0], w1[1], w1[0] * w2[0], w1[1] * w2[1]))  # a convolution's kernel stays in w2
        for factor in (-1, *sorted({side for w1_out, w1_in, *_ in sizes for side in (w1_out, w1_in) if side > 1})):
            if all(factorization(out, factor)[0] == a and factorization(inner, factor)[0] == b
                                  for a, b, out, inner in sizes):
                return {"lokr_factor": factor}
        return {"lokr_factor": -1}

    def build_hints(self, layers: list[dict[str, list[int]]]) -> dict[str, Any]:
        # A file whose every layer holds two full factors: PEFT keeps a factor full only from a rank
        # of half its side up, so such a file is rebuilt at a rank that always keeps them full (the
        # rank means nothing else there: their scale is 1, see above).
        return {"full_factors": True} if all("lokr_w1" in s and "lokr_w2" in s for s in layers) else {}


ADAPTER = LoKr()
