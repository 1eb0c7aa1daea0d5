"""Run with ComfyUI's Python (see test_comfyui_flux.py): builds a small FLUX model the way ComfyUI
does, then checks that Train LoRA's diffusers view of it shares ComfyUI's tensors and computes the
same output, also when ComfyUI holds the weights in fp8. Prints one JSON line of figures.

    python comfy_flux_check.py <ComfyUI dir> <folder holding a `lora_lab` link to this repository>
"""

import json
import sys
import types

import torch

sys.path[:0] = [sys.argv[1], sys.argv[2]]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.supported_models  # noqa: E402
from lora_lab.nodes.graph_model import shared_diffusers_flux  # noqa: E402
from lora_lab.trainer.families import get_family  # noqa: E402
from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity  # noqa: E402

torch.manual_seed(0)
config = dict(image_model="flux", in_channels=4, out_channels=4, vec_in_dim=16, context_in_dim=32, hidden_size=32,
              mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
              patch_size=2, qkv_bias=True, guidance_embed=True)
if "txt_ids_dims" in comfy.supported_models.Flux.unet_config or hasattr(comfy.supported_models, "Flux2"):
    config["txt_ids_dims"] = []  # ComfyUI 0.33 and newer: FLUX.1's text ids carry no positions
comfy_model = comfy.supported_models.Flux(config).get_model({}, "", device="cpu")
with torch.no_grad():
    for parameter in comfy_model.diffusion_model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.05)
comfy_model.diffusion_model.float().eval()
latents, text, pooled, sigma = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32), torch.randn(1, 16), torch.tensor([0.7])
with torch.no_grad():
    expected = comfy_model.diffusion_model(latents, sigma, text, y=pooled, guidance=torch.full([1], 3.5))


def ours() -> tuple[torch.nn.Module, torch.Tensor]:
    transformer = shared_diffusers_flux(types.SimpleNamespace(model=comfy_model))
    model = LoadedModel(get_family("flux"), transformer, Encoders(), None, "flow", ModelIdentity("check", "check"),
                        1024, guidance=3.5)
    with torch.no_grad():
        return transformer, model.family.predict(model, latents, sigma, {"prompt_embeds": text,
                                                                         "pooled_projections": pooled})


transformer, output = ours()
figures = {"max_difference": (output - expected).abs().max().item(), "scale": expected.abs().max().item(),
           "shares_storage": transformer.transformer_blocks[0].attn.to_k.weight.untyped_storage().data_ptr()
           == comfy_model.diffusion_model.double_blocks[0].img_attn.qkv.weight.untyped_storage().data_ptr()}
for module in comfy_model.diffusion_model.modules():  # as UNETLoader's weight_dtype fp8_e4m3fn holds them
    if isinstance(module, torch.nn.Linear):
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
transformer, output = ours()
figures["fp8_max_difference"] = (output - expected).abs().max().item()
figures["fp8_layer"] = type(transformer.transformer_blocks[0].attn.to_q).__name__
print(json.dumps(figures))
