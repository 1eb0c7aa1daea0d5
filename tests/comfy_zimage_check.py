"""Run with ComfyUI's Python (see test_comfyui_zimage.py): builds a small Z-Image model the way
ComfyUI does, then checks that Train LoRA's diffusers view of it shares ComfyUI's tensors (the
fused q/k/v sliced) and predicts what ComfyUI's own model predicts, also when ComfyUI holds the
weights in fp8. Prints one JSON line of figures.

    python comfy_zimage_check.py <ComfyUI dir> <folder holding a `lora_lab` link to this repository>
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
from lora_lab.nodes.graph_model import shared_diffusers_zimage  # noqa: E402
from lora_lab.trainer.families import get_family  # noqa: E402
from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity  # noqa: E402
from lora_lab.trainer.families.zimage import masked_rows  # noqa: E402

torch.manual_seed(0)
# ComfyUI's Z-Image block, narrowed: 8/3 of the width a multiple of 256 and the width at least 1024,
# where ComfyUI's and diffusers' feed-forward and timestep widths agree (they do at 3840).
config = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=1152, cap_feat_dim=64, n_layers=1,
              qk_norm=True, n_heads=9, n_kv_heads=9, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
              rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
              pad_tokens_multiple=32)
comfy_model = comfy.supported_models.ZImage(config).get_model({}, "", device="cpu")
with torch.no_grad():
    for parameter in comfy_model.diffusion_model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.02)
comfy_model.diffusion_model.float().eval()
latents, text, sigma = torch.randn(1, 16, 8, 8), torch.randn(1, 20, 64), torch.tensor([0.7])
with torch.no_grad():
    expected = comfy_model.diffusion_model(latents, sigma, text, 20)


def ours() -> tuple[torch.nn.Module, torch.Tensor]:
    transformer = shared_diffusers_zimage(types.SimpleNamespace(model=comfy_model))
    model = LoadedModel(get_family("zimage"), transformer, Encoders(), None, "flow", ModelIdentity("check", "check"),
                        1024)
    with torch.no_grad():
        # ComfyUI's sampler turns the model output v into x0 = x - σ·v; ours is the same v.
        return transformer, model.family.predict(model, latents, sigma, masked_rows([text], 512))


transformer, output = ours()
attention = comfy_model.diffusion_model.layers[0].attention
figures = {"max_difference": (output - expected).abs().max().item(), "scale": expected.abs().max().item(),
           "shares_storage": transformer.layers[0].attention.to_k.weight.untyped_storage().data_ptr()
           == attention.qkv.weight.untyped_storage().data_ptr()}
for module in comfy_model.diffusion_model.modules():  # as UNETLoader's weight_dtype fp8_e4m3fn holds them
    if isinstance(module, torch.nn.Linear):
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
transformer, output = ours()
figures["fp8_max_difference"] = (output - expected).abs().max().item()
figures["fp8_layer"] = type(transformer.layers[0].attention.to_q).__name__
print(json.dumps(figures))
