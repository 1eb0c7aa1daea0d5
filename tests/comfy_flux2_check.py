"""Run with ComfyUI's Python (see test_comfyui_flux2.py): builds a small FLUX.2 model the way ComfyUI
does, then checks that Train LoRA's diffusers view of it shares ComfyUI's tensors (the fused q/k/v
sliced) and predicts what ComfyUI's own model predicts, also when ComfyUI holds the weights in fp8.
Prints one JSON line of figures.

    python comfy_flux2_check.py <ComfyUI dir> <folder holding a `lora_lab` link to this repository>
"""

import json
import sys
import types

import torch

sys.path[:0] = [sys.argv[1], sys.argv[2]]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_detection  # noqa: E402
import comfy.supported_models  # noqa: E402
from lora_lab.nodes.graph_model import shared_diffusers_flux2  # noqa: E402
from lora_lab.trainer.families import get_family  # noqa: E402
from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity  # noqa: E402

torch.manual_seed(0)
# A FLUX.2 state dict in ComfyUI's (BFL's) layout, 256 wide, one double and two single blocks, read
# by ComfyUI's own detection as FLUX.2 Klein.
width, text_width = 256, 96
shapes = {"img_in.weight": (width, 128), "txt_in.weight": (width, text_width),
          "time_in.in_layer.weight": (width, 256), "time_in.out_layer.weight": (width, width),
          "double_stream_modulation_img.lin.weight": (6 * width, width),
          "double_stream_modulation_txt.lin.weight": (6 * width, width),
          "single_stream_modulation.lin.weight": (3 * width, width),
          "final_layer.linear.weight": (128, width), "final_layer.adaLN_modulation.1.weight": (2 * width, width)}
for stream in ("img", "txt"):
    shapes.update({f"double_blocks.0.{stream}_attn.qkv.weight": (3 * width, width),
                   f"double_blocks.0.{stream}_attn.proj.weight": (width, width),
                   f"double_blocks.0.{stream}_attn.norm.query_norm.scale": (128,),
                   f"double_blocks.0.{stream}_attn.norm.key_norm.scale": (128,),
                   f"double_blocks.0.{stream}_mlp.0.weight": (6 * width, width),
                   f"double_blocks.0.{stream}_mlp.2.weight": (width, 3 * width)})
for block in range(2):
    shapes.update({f"single_blocks.{block}.linear1.weight": (9 * width, width),
                   f"single_blocks.{block}.linear2.weight": (width, 4 * width),
                   f"single_blocks.{block}.norm.query_norm.scale": (128,),
                   f"single_blocks.{block}.norm.key_norm.scale": (128,)})
state = {key: torch.randn(shape) * (1.0 if key.endswith("scale") else 0.05) for key, shape in shapes.items()}
config = comfy.model_detection.detect_unet_config(state, "")
comfy_model = comfy.supported_models.Flux2(config).get_model({}, "", device="cpu")
comfy_model.load_model_weights(comfy.supported_models.Flux2(config).process_unet_state_dict(dict(state)), "")
comfy_model.diffusion_model.float().eval()
latents, text, sigma = torch.randn(1, 128, 4, 4), torch.randn(1, 12, text_width), torch.tensor([0.7])
with torch.no_grad():
    expected = comfy_model.diffusion_model(latents, sigma, text)


def ours() -> tuple[torch.nn.Module, torch.Tensor]:
    transformer = shared_diffusers_flux2(types.SimpleNamespace(model=comfy_model))
    model = LoadedModel(get_family("flux2"), transformer, Encoders(), None, "flow", ModelIdentity("check", "check"),
                        1024)
    with torch.no_grad():
        return transformer, model.family.predict(model, latents, sigma, {"prompt_embeds": text})


transformer, output = ours()
figures = {"max_difference": (output - expected).abs().max().item(), "scale": expected.abs().max().item(),
           "image_model": config["image_model"],
           "shares_storage": transformer.transformer_blocks[0].attn.to_k.weight.untyped_storage().data_ptr()
           == comfy_model.diffusion_model.double_blocks[0].img_attn.qkv.weight.untyped_storage().data_ptr()}
for module in comfy_model.diffusion_model.modules():  # as UNETLoader's weight_dtype fp8_e4m3fn holds them
    if isinstance(module, torch.nn.Linear):
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
transformer, output = ours()
figures["fp8_max_difference"] = (output - expected).abs().max().item()
figures["fp8_layer"] = type(transformer.transformer_blocks[0].attn.to_q).__name__
print(json.dumps(figures))
