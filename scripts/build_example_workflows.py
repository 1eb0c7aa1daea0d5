"""Write example_workflows/*.json (ComfyUI's UI format, shown in its Templates browser) from short
graph descriptions, ordering widget values as the server's /object_info says.

    python scripts/build_example_workflows.py --object-info object_info.json

(object_info.json: `GET /object_info` of a ComfyUI with LoRA Lab installed.) The real-server test
converts the same files back to API prompts, so examples and test stay twins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
CHECKPOINT = "your_sd15_checkpoint.safetensors"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# (id, class, widget values, {input: (source id, source slot)}); unlisted widgets keep their defaults.
TRAIN_AND_TEST = [
    (1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, {}),
    (2, "LoraLabLoadDataset", {"folder": "my_dataset", "lora_type": "style", "trigger_word": "xyz_style"}, {}),
    (3, "LoraLabCaption", {"trigger_word": "xyz_style"}, {"dataset": (2, 0)}),
    (4, "LoraLabTrainLora", {"preset": "style", "name": "xyz_style"},
     {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (3, 0)}),
    (5, "LoraLabSampleCheckpoint", {"prompts": "{trigger}, a lighthouse at dusk\n{trigger}, a cat"},
     {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "training_run": (4, 2)}),
    (6, "LoraLabApplyLoraStack", {}, {"model": (1, 0), "clip": (1, 1), "training_run": (4, 2)}),
    (7, "CLIPTextEncode", {"text": "xyz_style, a mountain lake"}, {"clip": (6, 1)}),
    (8, "CLIPTextEncode", {"text": ""}, {"clip": (6, 1)}),
    (9, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}),
    (10, "KSampler", {"seed": 0, "steps": 20, "cfg": 7.0},
     {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}),
    (11, "VAEDecode", {}, {"samples": (10, 0), "vae": (1, 2)}),
    (12, "SaveImage", {"filename_prefix": "lora_lab"}, {"images": (11, 0)}),
]
COMPARE_LORAS = [
    (1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, {}),
    (2, "LoraLabSampleCheckpoint", {"prompts": "a portrait photo\na landscape painting",
                                    "lora_names": "first_lora.safetensors\nsecond_lora.safetensors"},
     {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}),
]
STACK_TWO = [
    (1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, {}),
    (2, "LoraLabApplyLoraStack", {"auto_strengths": True, "lora_1": "first_lora.safetensors",
                                  "lora_2": "second_lora.safetensors"}, {"model": (1, 0), "clip": (1, 1)}),
    (3, "CLIPTextEncode", {"text": "a portrait photo"}, {"clip": (2, 1)}),
    (4, "CLIPTextEncode", {"text": ""}, {"clip": (2, 1)}),
    (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}),
    (6, "KSampler", {"seed": 0, "steps": 20, "cfg": 7.0},
     {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
    (7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}),
    (8, "SaveImage", {"filename_prefix": "lora_stack"}, {"images": (7, 0)}),
]
# FLUX.1-dev as ComfyUI users hold it: the transformer, CLIP-L + T5-XXL and the VAE as separate files.
# The transformer loads in fp8, so Train LoRA keeps it in fp8 (about 12 GB instead of 24).
TRAIN_FLUX = [
    (1, "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}, {}),
    (2, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                           "type": "flux"}, {}),
    (3, "VAELoader", {"vae_name": "ae.safetensors"}, {}),
    (4, "LoraLabLoadDataset", {"folder": "my_dataset", "lora_type": "character", "trigger_word": "xyz_person",
                               "family": "flux"}, {}),
    (5, "LoraLabCaption", {"trigger_word": "xyz_person", "family": "flux"}, {"dataset": (4, 0)}),
    (6, "LoraLabTrainLora", {"preset": "character", "name": "xyz_person_flux", "gradient_checkpointing": True,
                             "rank": 16},
     {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "dataset": (5, 0)}),
    (7, "LoraLabSampleCheckpoint", {"prompts": "{trigger}, portrait photo in a garden\n{trigger}, as an astronaut",
                                    "cfg": 3.5, "width": 1024, "height": 1024},
     {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "training_run": (6, 2)}),
]
EXAMPLES = {"train_and_test_lora": TRAIN_AND_TEST, "compare_lora_strengths": COMPARE_LORAS,
            "stack_two_loras": STACK_TWO, "train_flux_lora": TRAIN_FLUX}


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's inputs in order, required first."""
    specs = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            specs.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return specs


def default_value(kind: str, options: dict, spec0) -> object:
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = options.get("options") or (spec0 if isinstance(spec0, list) else [])
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def to_ui(graph: list, object_info: dict) -> dict:
    nodes, links = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id, class_type, widgets, connections in graph:
        info = object_info[class_type]
        inputs, values = [], []
        for name, kind, options in input_specs(info):
            raw = info["input"].get("required", {}).get(name) or info["input"]["optional"][name]
            if kind in WIDGET_TYPES and name not in connections:
                values.append(widgets.get(name, default_value(kind, options, raw[0])))
                if options.get("control_after_generate"):
                    values.append("fixed")
                continue
            link = None
            if name in connections:
                source, slot = connections[name]
                link = len(links) + 1
                links.append([link, source, slot, node_id, len(inputs), kind])
                outgoing.setdefault((source, slot), []).append(link)
            inputs.append({"name": name, "type": kind, "link": link})
        nodes.append({"id": node_id, "type": class_type, "pos": [0, 0], "size": [320, 200], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": inputs, "outputs": [],
                      "properties": {"Node name for S&R": class_type}, "widgets_values": values})
    for node, (node_id, class_type, _, _) in zip(nodes, graph, strict=True):
        info = object_info[class_type]
        node["outputs"] = [{"name": name, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
                           for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))]
        column = node["order"] % 4
        node["pos"] = [40 + column * 380, 40 + (node["order"] // 4) * 420]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object-info", type=Path, required=True)
    args = parser.parse_args()
    object_info = json.loads(args.object_info.read_text())
    OUT.mkdir(exist_ok=True)
    for name, graph in EXAMPLES.items():
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(graph, object_info), indent=1) + "\n")


if __name__ == "__main__":
    main()
