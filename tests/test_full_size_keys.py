"""Exported LoRA key names for the real, full-size models, built on the meta device (no weights):
every name is a real module and matches a pattern ComfyUI's LoRA loader maps for that family.

The patterns below are the forms ComfyUI 0.3.64's `comfy/lora.py` accepts (the real-server test
is the authority): kohya names over diffusers module paths for SD 1.5 / SDXL UNets
(`lora_unet_<path with _>`), `lora_te_` / `lora_te1_` / `lora_te2_` + `text_model_encoder_layers_N_...`
for CLIP, and `transformer.<diffusers path>` for FLUX.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from lora_lab.trainer.export import named_layers
from lora_lab.trainer.families import get_family
from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity
from lora_lab.trainer.families.sd15 import CONFIGS
from lora_lab.trainer.lora import add_lora
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

UNET_BLOCK = r"(down_blocks_\d_attentions_\d|mid_block_attentions_0|up_blocks_\d_attentions_\d)_transformer_blocks_\d+"
UNET_LAYER = r"(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2)"
CLIP_LAYER = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
PATTERNS = {
    "sd15": [rf"lora_unet_{UNET_BLOCK}_{UNET_LAYER}", rf"lora_te_{CLIP_LAYER}"],
    "sdxl": [rf"lora_unet_{UNET_BLOCK}_{UNET_LAYER}", rf"lora_te1_{CLIP_LAYER}", rf"lora_te2_{CLIP_LAYER}"],
    "flux": [r"transformer\.transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
             r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
             r"transformer\.single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"],
}
# Layers per family with targets = attention_mlp (+ text encoders' attention for SD 1.5 / SDXL).
META = ModelIdentity("meta", "meta")
EXPECTED_COUNTS = {"sd15": 16 * 10 + 12 * 4, "sdxl": 70 * 10 + 12 * 4 + 32 * 4, "flux": 19 * 12 + 38 * 5}


def _config(family: str, part: str) -> dict:
    return json.loads((CONFIGS / family / part / "config.json").read_text())


def _meta_model(name: str) -> LoadedModel:
    family = get_family(name)
    with torch.device("meta"):
        if name == "flux":
            return LoadedModel(family, FluxTransformer2DModel.from_config(_config("flux", "transformer")), Encoders(),
                               None, "flow", META, 1024)
        unet = UNet2DConditionModel.from_config(_config(name, "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig(**_config(name, "text_encoder")))]
        if name == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_config(name, "text_encoder_2"))))
    return LoadedModel(family, unet, Encoders(encoders), None, "epsilon", META, 1024)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_exported_names_are_real_modules_in_patterns_comfyui_maps(name):
    model = _meta_model(name)
    add_lora(model, 16, 16, "attention_mlp", name != "flux")
    names = [layer_name for layer_name, _ in named_layers(model)]
    patterns = [re.compile(pattern) for pattern in PATTERNS[name]]
    unmatched = [n for n in names if not any(p.fullmatch(n) for p in patterns)]
    assert not unmatched, unmatched[:5]
    assert len(names) == len(set(names)) == EXPECTED_COUNTS[name]
    if name == "flux":  # diffusers names: each one must be a Linear of the real transformer
        for layer_name in names:
            module = model.denoiser.get_submodule(layer_name.removeprefix("transformer.")).base_layer
            assert isinstance(module, torch.nn.Linear)
        assert "transformer.proj_out" not in names  # the final layer is not a target


def test_shipped_full_size_configs_have_the_published_sizes():
    sizes = {name: sum(p.numel() for p in _meta_model(name).denoiser.parameters()) / 1e6 for name in PATTERNS}
    print({name: f"{size:.1f}M" for name, size in sizes.items()})
    assert round(sizes["sd15"]) == 860 and round(sizes["sdxl"]) == 2567 and round(sizes["flux"]) == 11901


def test_flux_original_layout_round_trips_at_full_size():
    from lora_lab.trainer.families.flux_layout import to_diffusers, to_original

    model = _meta_model("flux")
    state = model.denoiser.state_dict()
    original = to_original(state, 19, 38, 3072)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert original["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)
    assert {k: v.shape for k, v in to_diffusers(original).items()} == {k: v.shape for k, v in state.items()}
