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


def zimage_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer's tensors as Tongyi's and ComfyUI's files hold them (q, k and
    v fused; written here from the two layouts' names, apart from the loader's converter)."""
    renames = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    original = {}
    for key, value in state.items():
        if key.endswith((".attention.to_k.weight", ".attention.to_v.weight")):
            continue
        if key.endswith(".attention.to_q.weight"):
            block = key.removesuffix(".to_q.weight")
            original[f"{block}.qkv.weight"] = torch.cat([state[f"{block}.to_{p}.weight"] for p in "qkv"])
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        original[key] = value
    return original


def flux2_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX.2 transformer's tensors as BFL's and ComfyUI's files hold them (double-block
    q/k/v fused, the final modulation's halves swapped; written apart from the loader's converter)."""
    block_names = {"attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
                   "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
                   "ff_context.linear_in.weight": "txt_mlp.0.weight",
                   "ff_context.linear_out.weight": "txt_mlp.2.weight",
                   "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                   "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                   "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                   "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
    single_names = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
                    "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    top_names = {"x_embedder.weight": "img_in.weight", "context_embedder.weight": "txt_in.weight",
                 "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
                 "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
                 "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
                 "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
                 "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
                 "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
                 "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
                 "proj_out.weight": "final_layer.linear.weight"}
    original = {}
    for key, value in state.items():
        if key in top_names:
            original[top_names[key]] = value
        elif key == "norm_out.linear.weight":  # diffusers keeps (scale, shift), BFL (shift, scale)
            scale, shift = value.chunk(2)
            original["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        elif key.startswith("transformer_blocks."):
            _, number, rest = key.split(".", 2)
            prefix = f"double_blocks.{number}."
            if rest in ("attn.to_q.weight", "attn.add_q_proj.weight"):
                names = ("to_q", "to_k", "to_v") if rest.startswith("attn.to_q") else ("add_q_proj", "add_k_proj",
                                                                                         "add_v_proj")
                stream = "img" if names[0] == "to_q" else "txt"
                original[f"{prefix}{stream}_attn.qkv.weight"] = torch.cat(
                    [state[f"transformer_blocks.{number}.attn.{name}.weight"] for name in names])
            elif rest in block_names:
                original[prefix + block_names[rest]] = value
        elif key.startswith("single_transformer_blocks."):
            _, number, rest = key.split(".", 2)
            original[f"single_blocks.{number}.{single_names[rest]}"] = value
    return original
