"""The FLUX transformer's two tensor layouts: Black Forest Labs' original one (single-file models,
ComfyUI's models/diffusion_models) and diffusers'. One table drives both directions.

The original layout fuses projections: a double block's `img_attn.qkv` holds diffusers' to_q,
to_k and to_v stacked by rows (likewise `txt_attn.qkv` the add_*_proj), and a single block's
`linear1` holds to_q, to_k, to_v and proj_mlp. The final modulation stores (shift, scale) where
diffusers stores (scale, shift). Works at any width, block count or head size.
"""

from __future__ import annotations

import torch

SWAP_HALVES = "swap"

DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
          "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
          "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
       "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}


def block_counts(names: list[str]) -> tuple[int, int]:
    """(double, single) block counts of an original-layout state dict."""
    def count(prefix: str) -> int:
        return len({name.split(".")[1] for name in names if name.startswith(prefix)})
    return count("double_blocks."), count("single_blocks.")


def layout_table(double: int, single: int, hidden: int) -> list[tuple[str, list[str], list[int] | str | None]]:
    """(original name, diffusers names, row split sizes | SWAP_HALVES | None for a plain rename)."""
    table: list[tuple[str, list[str], list[int] | str | None]] = []
    for end in ("weight", "bias"):
        for index in range(double):
            bfl, ours = f"double_blocks.{index}.", f"transformer_blocks.{index}."
            table.append((f"{bfl}img_attn.qkv.{end}", [f"{ours}attn.to_{p}.{end}" for p in "qkv"], [hidden] * 3))
            table.append((f"{bfl}txt_attn.qkv.{end}", [f"{ours}attn.add_{p}_proj.{end}" for p in "qkv"],
                          [hidden] * 3))
            table += [(f"{bfl}{old}.{end}", [f"{ours}{new}.{end}"], None) for old, new in DOUBLE.items()]
        for index in range(single):
            bfl, ours = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
            parts = [f"{ours}attn.to_{p}.{end}" for p in "qkv"] + [f"{ours}proj_mlp.{end}"]
            table.append((f"{bfl}linear1.{end}", parts, [hidden] * 3 + [4 * hidden]))
            table += [(f"{bfl}{old}.{end}", [f"{ours}{new}.{end}"], None) for old, new in SINGLE.items()]
        table += [(f"{old}.{end}", [f"{new}.{end}"], None) for old, new in TOP.items()]
        table.append((f"final_layer.adaLN_modulation.1.{end}", [f"norm_out.linear.{end}"], SWAP_HALVES))
    for index in range(double):
        table += [(f"double_blocks.{index}.{old}", [f"transformer_blocks.{index}.{new}"], None)
                  for old, new in DOUBLE_NORMS.items()]
    for index in range(single):
        table += [(f"single_blocks.{index}.{old}", [f"single_transformer_blocks.{index}.{new}"], None)
                  for old, new in SINGLE_NORMS.items()]
    return table


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout state dict (with or without `model.diffusion_model.`) in diffusers names."""
    state = {name.removeprefix("model.diffusion_model."): tensor for name, tensor in state.items()}
    hidden = state["img_in.weight"].shape[0]
    converted = {}
    for old, new, split in layout_table(*block_counts(list(state)), hidden):
        if old not in state:
            continue  # e.g. no guidance_in in a guidance-free model
        tensor = state[old]
        if split == SWAP_HALVES:
            converted[new[0]] = _swap_halves(tensor)
        elif split is None:
            converted[new[0]] = tensor
        else:
            converted.update(zip(new, torch.split(tensor, split, dim=0), strict=True))
    return converted


def to_original(state: dict[str, torch.Tensor], double: int, single: int, hidden: int) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the original layout (for writing files like those people download)."""
    converted = {}
    for old, new, split in layout_table(double, single, hidden):
        if new[0] not in state:
            continue
        if split == SWAP_HALVES:
            converted[old] = _swap_halves(state[new[0]])
        else:
            converted[old] = torch.cat([state[name] for name in new], dim=0) if split else state[new[0]]
    return converted
