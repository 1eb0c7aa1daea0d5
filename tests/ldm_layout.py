"""Test helper: write a diffusers SD 1.5 or SDXL model as one original-format checkpoint, the
layout people download and ComfyUI loads, so single-file loading is tested with no download.

Key names follow the original Stable Diffusion code: `model.diffusion_model.` (UNet),
`first_stage_model.` (VAE), `cond_stage_model.transformer.text_model.` (CLIP); SDXL's
generative-models layout has `conditioner.embedders.0.transformer.text_model.` (CLIP-L) and
`conditioner.embedders.1.model.` (OpenCLIP-G, fused attention projections).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, config) -> str:
    per_block = config.layers_per_block
    parts = key.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{rest.removeprefix('conv.')}"
        slot = 1 + block * (per_block + 1) + index
        if kind == "resnets":
            return f"input_blocks.{slot}.0.{_rename(rest, RESNET)}"
        return f"input_blocks.{slot}.1.{rest}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_rename(rest, RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config.up_block_types[block]
            return f"output_blocks.{block * (per_block + 1) + per_block}.{2 if has_attention else 1}.{rest}"
        slot = block * (per_block + 1) + index
        if kind == "resnets":
            return f"output_blocks.{slot}.0.{_rename(rest, RESNET)}"
        return f"output_blocks.{slot}.1.{rest}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    parts = key.split(".")
    coder = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        block = int(parts[2])
        level = block if coder == "encoder" else levels - 1 - block
        word = "down" if coder == "encoder" else "up"
        kind, rest = parts[3], ".".join(parts[5:])
        if kind == "resnets":
            return f"{coder}.{word}.{level}.block.{parts[4]}.{_rename(rest, VAE_RESNET)}"
        return f"{coder}.{word}.{level}.{'downsample' if coder == 'encoder' else 'upsample'}.{rest}"
    if parts[1] == "mid_block":
        rest = ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{coder}.mid.block_{int(parts[3]) + 1}.{_rename(rest, VAE_RESNET)}"
        return f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
    if parts[1] == "conv_norm_out":
        return f"{coder}.norm_out.{parts[2]}"
    return key


OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_tensors(encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (as SDXL checkpoints hold CLIP-G)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T.contiguous()}
    for layer in range(encoder.config.num_hidden_layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in OPEN_CLIP_LAYER.items():
                out[f"{target}{old}.{kind}"] = state[f"{source}{new}.{kind}"]
    return out


def write_ldm_checkpoint(unet, vae, text_encoder, path: Path, text_encoder_2=None) -> None:
    """SD 1.5 layout, or SDXL's when a second (OpenCLIP-G) text encoder is given."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        tensors["model.diffusion_model." + unet_key(key, unet.config)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1×1 convolutions
        tensors["first_stage_model." + name] = value
    clip_l = "conditioner.embedders.0.transformer." if text_encoder_2 is not None else "cond_stage_model.transformer."
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors[clip_l + key] = value
    if text_encoder_2 is not None:
        for key, value in open_clip_tensors(text_encoder_2).items():
            tensors["conditioner.embedders.1.model." + key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
