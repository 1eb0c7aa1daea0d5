"""Run with ComfyUI's Python (see test_comfyui_server.py): a graph's CLIP as Train LoRA trains its
text encoder, against ComfyUI's own code. Prints one JSON line.

    python comfy_text_encoder_check.py <ComfyUI dir> <folder holding lora_lab> <checkpoint> <lora> <text>

1. The copy of the CLIP's modules that holds the adapter (comfy_bridge.trainable_text_stage)
   encodes the text exactly as the CLIP's own encode_from_tokens does.
2. The text-encoder half of `lora` (a file Train LoRA trained), put into that copy as a run that
   starts from it does (trainer/init_lora.py), encodes the text as core LoraLoader's CLIP half
   (comfy.sd.load_lora_for_models at strength_clip 1) does with the same file.
"""

import json
import logging
import sys
from pathlib import Path

comfy_dir, packages, checkpoint, lora_file, text = sys.argv[1:6]
sys.path[:0] = [comfy_dir, packages]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from lora_lab.nodes import comfy_bridge, graph_model  # noqa: E402
from lora_lab.trainer.families.base import ModelIdentity  # noqa: E402
from lora_lab.trainer.init_lora import apply_starting_weights, read_starting_adapter  # noqa: E402
from lora_lab.trainer.lora import add_lora  # noqa: E402


class Unloaded(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "lora key not loaded" in record.getMessage():
            self.keys.append(record.getMessage().rsplit(" ", 1)[-1])


def largest_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.double() - second.double()).abs().max().item()


unloaded = Unloaded()
logging.getLogger().addHandler(unloaded)
# The text encoder in fp32: core LoraLoader merges the change into the weights, which in half precision
# would round it (ComfyUI keeps this checkpoint's CLIP in fp16 on the CPU otherwise).
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True,
                                                            te_model_options={"dtype": torch.float32})[:4]
report = {}
with comfy_bridge.training_mode():
    clip_cond, clip_pooled = comfy_bridge.encode_pooled(clip, text)
    loaded = graph_model.loaded_model(model, clip, vae, ModelIdentity("check", "check"), text_encoder=True)
    stage = loaded.encoders.stage
    with torch.no_grad():
        copy_cond, copy_pooled = comfy_bridge.encode_pooled(clip, text, stage)
    report["copy_vs_clip"] = max(largest_difference(copy_cond, clip_cond), largest_difference(copy_pooled, clip_pooled))
    start = read_starting_adapter(Path(lora_file), loaded)
    add_lora(loaded, start.rank or 0, start.alpha, "attention", True, start.adapter, modules=start.modules,
             **start.options, **start.hints)
    apply_starting_weights(loaded, start)
    with torch.no_grad():
        ours, ours_pooled = comfy_bridge.encode_pooled(clip, text, stage)
    report["text_encoder_layers"] = sum(len(paths) for prefix, paths in start.modules.items() if prefix != "lora_unet")
    _, patched = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(lora_file), 0.0, 1.0)
    core, core_pooled = patched.encode_from_tokens(patched.tokenize(text), return_pooled=True)
report["core_changed"] = largest_difference(core, clip_cond)
report["ours_vs_core"] = max(largest_difference(ours, core), largest_difference(ours_pooled, core_pooled))
report["unloaded"] = unloaded.keys
print(json.dumps(report))
