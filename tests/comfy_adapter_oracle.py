"""Run with ComfyUI's Python (see test_comfyui_server.py): ComfyUI's own LoRA code (comfy.lora's
load_lora and calculate_weight, which dispatch to its weight_adapter types) computes each layer's
weight change from adapter files, an oracle we did not write. Prints one JSON line: per file, the
keys ComfyUI did not load.

    python comfy_adapter_oracle.py <ComfyUI dir> <jobs.json>

jobs.json lists {"file": ..., "shapes": {layer name: weight shape}, "out": ..., "base": ...}; each
layer's change at strength 1 is written to `out` as a .safetensors file, on the layer's base weight
from `base` (a .safetensors file by layer name: a DoRA's change depends on it) or, without one, on
a zero weight (LoRA, LoHa and LoKr changes do not depend on it).
"""

import json
import logging
import sys

import torch

sys.path.insert(0, sys.argv[1])
jobs_path = sys.argv[2]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


class Unloaded(logging.Handler):
    """Collects ComfyUI's "lora key not loaded" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "lora key not loaded" in message:
            self.keys.append(message.rsplit(" ", 1)[-1])


unloaded = Unloaded()
logging.getLogger().addHandler(unloaded)
report = {}
with open(jobs_path) as handle:
    jobs = json.load(handle)
for job in jobs:
    unloaded.keys = []
    lora = comfy.utils.load_torch_file(job["file"], safe_load=True)
    patches = comfy.lora.load_lora(lora, {name: name for name in job["shapes"]})
    bases = comfy.utils.load_torch_file(job["base"], safe_load=True) if job.get("base") else {}
    deltas = {}
    for name, shape in job["shapes"].items():
        weight = bases[name].float() if name in bases else torch.zeros(shape)
        changed = comfy.lora.calculate_weight([(1.0, patches[name], 1.0, None, None)], weight.clone(), name)
        deltas[name] = (changed - weight).contiguous()
    save_file(deltas, job["out"])
    report[job["file"]] = {"unloaded": unloaded.keys, "patched": len(patches)}
print(json.dumps(report))
