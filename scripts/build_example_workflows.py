"""Write example_workflows/*.json (ComfyUI's UI format, listed in its Templates browser) from short
graph descriptions, against a running ComfyUI with LoRA Lab installed:

    python scripts/build_example_workflows.py --url http://127.0.0.1:8188

(The shipped files were built against ComfyUI 0.3.64, the FLUX.2 one against 0.33.0, whose object
info it needs; against an older server an example whose nodes it lacks keeps its file.)

Widget values are laid out by scripts/frontend_rules.py (the frontend's own rules, proved by the
browser tests). Nodes are placed from their real sizes, measured in the frontend itself through
headless Chromium, in titled groups (dataset, train, test) with a Note saying what to set. The file
name is the title the Templates browser shows (the frontend offers custom nodes no other title).
Thumbnails (`<name>.jpg`) come from scripts/render_example_thumbnails.py.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontend_rules import FRONTEND_ONLY_NODES, WIDGET_TYPES, widget_history, widgets_values

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
CHECKPOINT = "your_sd15_checkpoint.safetensors"
GAP = 40  # between nodes in a column and between columns
GROUP_PADDING = 16
GROUP_TITLE = 40  # the group's title bar
NODE_TITLE = 30  # LiteGraph draws a node's title above its position
NOTE_SIZE = (360, 170)
STACK_ROOM = 160  # below Apply LoRA Stack's widgets: what it applied, and its taller rows in Nodes 2.0
# Sample Checkpoint lays its grid out at its width: a 150 px label column and four strengths of
# about 160 px, so cells stay over 128 px on screen at the zoom the examples open at.
GRID_WIDTH, GRID_ROOM = 840, 720


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input -> (source node, output slot)
    title: str | None = None
    width: int | None = None  # wider than measured (e.g. room for a preview)
    extra_height: int = 0  # room below the widgets for previews


def note(node_id: int, text: str) -> Node:
    return Node(node_id, NOTE, {"text": text})


@dataclass
class Group:
    title: str
    columns: list[list[Node]]
    colour: str = "#3f789e"


@dataclass
class Example:
    name: str  # the file name, which the Templates browser shows as the title
    groups: list[Group]
    opens_on: int = 0  # the example opens zoomed on its first groups up to this one (0: all of them)
    needs: str = ""  # the first ComfyUI release that runs it (its model family's), if not every one


VIEWPORT = (1600, 1000)  # the screen the opening view is made for (the browser tests use it)
CANVAS_LEFT, CANVAS_TOP = 56, 70  # where the canvas starts on screen: right of the side bar, below the top bar
MARGIN = 12
# The frontend's Markdown note: its text reads at the size of the nodes' own (a plain Note's is smaller).
NOTE = "MarkdownNote"
READABLE_ZOOM = 0.8  # 15 px labels on the nodes read at 12 px


def stacked_prompt() -> list[Node]:
    """The test group's prompt over the run's LoRA: Apply LoRA Stack (node 9, over loaders 1 and 2 and
    Train LoRA 6), its trigger words joined to your words (10), encoded with the stack's CLIP (11)."""
    return [
        Node(9, "LoraLabApplyLoraStack", {}, {"model": (1, 0), "clip": (2, 0), "training_run": (6, 2)},
             extra_height=STACK_ROOM),
        Node(10, "StringConcatenate", {"string_b": "portrait photo in a garden", "delimiter": ", "},
             {"string_a": (9, 3)}, title="Prompt text: trigger words + your words"),
        Node(11, "CLIPTextEncode", {"text": ""}, {"clip": (9, 1), "text": (10, 0)}, title="Prompt"),
    ]


# --- the examples ---------------------------------------------------------------------------------
SAMPLE = {"seed": 0, "steps": 20, "cfg": 7.0}
DATASET_SHEET_ROOM = 400  # Load Dataset's sheet of flagged images: two rows of four at a readable size
DATASET_WIDTH = 560
TRAIN_AND_TEST = Example("Train a LoRA and test it (SD 1.5)", opens_on=2, groups=[
    Group("1 · Dataset", [[
        note(13, "1. Put 10-50 images with same-name .txt captions in ComfyUI/input/my_dataset (or set folder to an "
                 "absolute path); pick your SD 1.5 checkpoint in Load Checkpoint.\n2. Choose the LoRA type and a "
                 "trigger word, a made-up word like xyz_style: typed once, here. Caption, Train LoRA and the test "
                 "prompts take it from the dataset.\n3. The report on Load Dataset says what to fix before training "
                 "(queue Load Dataset alone to check); Caption shows every caption (edit them there, or let a "
                 "captioner in models/captioners write the missing ones).\n4. Queue. Train LoRA's panel shows the "
                 "plan (what each 0 becomes), the loss and the time left; Cancel saves, and resume = latest continues. "
                 "Queue again any time: a finished run is handed on, not retrained."),
        Node(2, "LoraLabLoadDataset", {"folder": "my_dataset", "lora_type": "style", "trigger_word": "xyz_style"},
             {"model": (1, 0)}, width=DATASET_WIDTH,
             extra_height=DATASET_SHEET_ROOM),
    ], [
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}),
        Node(3, "LoraLabCaption", {}, {"dataset": (2, 0), "model": (1, 0)}),  # the trigger from Load Dataset
    ]]),
    Group("2 · Train", [[
        # At the top of its column, so its panel is in view when the example opens.
        Node(4, "LoraLabTrainLora", {"name": "xyz_style"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (3, 0)}, width=440),
    ]], colour="#8a6d3b"),
    Group("3 · Test", [[
        Node(5, "LoraLabSampleCheckpoint", {"prompts": "{trigger}, a lighthouse at dusk\n{trigger}, a cat"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "training_run": (4, 2)}, width=GRID_WIDTH,
             extra_height=GRID_ROOM),
    ], [
        # Nodes 2.0 draws this node's 17 widget rows taller than the classic canvas measures them.
        Node(6, "LoraLabApplyLoraStack", {}, {"model": (1, 0), "clip": (1, 1), "training_run": (4, 2)},
             extra_height=STACK_ROOM),
        # The trigger word reaches the prompt through the stack, with core nodes only.
        Node(15, "StringConcatenate", {"string_b": "a mountain lake", "delimiter": ", "}, {"string_a": (6, 3)},
             title="Prompt text: trigger words + your words"),
        Node(7, "CLIPTextEncode", {"text": ""}, {"clip": (6, 1), "text": (15, 0)}, title="Prompt"),
        Node(8, "CLIPTextEncode", {"text": ""}, {"clip": (6, 1)}, title="Negative prompt"),
    ], [
        Node(9, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        Node(10, "KSampler", SAMPLE, {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}),
        Node(11, "VAEDecode", {}, {"samples": (10, 0), "vae": (1, 2)}),
        Node(12, "SaveImage", {"filename_prefix": "lora_lab"}, {"images": (11, 0)}, extra_height=260),
    ]], colour="#3f7f4f"),
])
COMPARE_LORAS = Example("Compare LoRAs by strength", [
    Group("Compare", [[
        note(3, "Compare LoRA files side by side: one row per LoRA (and prompt), one column per strength, the same "
                "seed in every cell.\n1. Pick your checkpoint.\n2. List LoRA files from models/loras, one per line, "
                "as LoraLoader names them.\n3. Queue."),
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}),
    ], [
        Node(2, "LoraLabSampleCheckpoint", {"prompts": "a portrait photo\na landscape painting",
                                            "lora_names": "first_lora.safetensors\nsecond_lora.safetensors"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}, width=GRID_WIDTH, extra_height=GRID_ROOM),
    ]]),
])
STACK_TWO = Example("Stack two LoRAs", [
    Group("Stack", [[
        note(9, "Two LoRAs at once with the guide's stacking strengths (first 0.7, second 0.5, third 0.35; turn "
                "auto_strengths off to set your own).\n1. Pick your checkpoint and the two LoRAs.\n2. Write your "
                "prompt in 'Prompt text': both trigger words are put in front of it from the LoRA files.\n3. Queue. "
                "Compare LoRA Stack draws the pair across the guide's ranges (first 0.6-0.8 in columns, second "
                "0.4-0.6 in rows, 0 showing the base and each alone): if one overrides the other, lower it there."),
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}),
        Node(2, "LoraLabApplyLoraStack", {"auto_strengths": True, "lora_1": "first_lora.safetensors",
                                          "lora_2": "second_lora.safetensors"}, {"model": (1, 0), "clip": (1, 1)},
             extra_height=STACK_ROOM),
    ], [
        Node(10, "StringConcatenate", {"string_b": "a portrait photo", "delimiter": ", "}, {"string_a": (2, 3)},
             title="Prompt text: trigger words + your words"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (2, 1), "text": (10, 0)}, title="Prompt"),
        Node(4, "CLIPTextEncode", {"text": ""}, {"clip": (2, 1)}, title="Negative prompt"),
        Node(5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
    ], [
        Node(6, "KSampler", SAMPLE, {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}),
        Node(8, "SaveImage", {"filename_prefix": "lora_stack"}, {"images": (7, 0)}, extra_height=260),
    ], [
        Node(11, "LoraLabCompareLoraStack", {"prompts": "{trigger}, a portrait photo"},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "lora_stack": (2, 2)}, width=GRID_WIDTH,
             extra_height=GRID_ROOM),
    ]]),
])
# FLUX.1-dev as ComfyUI users hold it: the transformer, CLIP-L + T5-XXL and the VAE as separate files.
# The transformer loads in fp8, so Train LoRA keeps it in fp8 (about 12 GB instead of 24). FLUX.1-dev
# is guidance-distilled: its graphs sample at cfg 1 with FluxGuidance and no negative (ComfyUI's own
# FLUX example: euler, simple, guidance 3.5).
FLUX_SAMPLE = {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
TRAIN_FLUX = Example("Train a FLUX.1-dev LoRA", opens_on=2, groups=[
    Group("1 · Dataset", [[
        note(8, "1. Put 20-50 photos with .txt captions in ComfyUI/input/my_dataset; pick flux1-dev (loaded in fp8: "
                "about 12 GB), clip_l + t5xxl and ae.safetensors.\n2. FLUX likes sentences: Caption (connected to "
                "the FLUX model) turns tags into them, the trigger word (typed once, on Load Dataset) first.\n3. "
                "Read the report on Load Dataset before training, then Queue (gradient checkpointing is on, to fit "
                "24 GB GPUs).\n4. Test: Sample Checkpoint compares checkpoints and strengths; Apply LoRA Stack "
                "feeds your own sampler (guidance 3.5, cfg 1, no negative) with the trigger word in front."),
        Node(4, "LoraLabLoadDataset", {"folder": "my_dataset", "lora_type": "character", "trigger_word": "xyz_person"},
             {"model": (1, 0)}, width=DATASET_WIDTH,
             extra_height=DATASET_SHEET_ROOM),
    ], [
        Node(1, "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}),
        Node(2, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                   "type": "flux"}),
        Node(3, "VAELoader", {"vae_name": "ae.safetensors"}),
        Node(5, "LoraLabCaption", {}, {"dataset": (4, 0), "model": (1, 0)}),
    ]]),
    Group("2 · Train", [[
        Node(6, "LoraLabTrainLora", {"name": "xyz_person_flux", "gradient_checkpointing": True, "rank": 16},
             {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "dataset": (5, 0)}, width=440),
    ]], colour="#8a6d3b"),
    Group("3 · Test", [[
        Node(7, "LoraLabSampleCheckpoint", {"prompts": "{trigger}, portrait photo in a garden\n{trigger}, as an "
                                                       "astronaut", "cfg": 3.5, "width": 1024, "height": 1024,
                                            "scheduler": "simple"},
             {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "training_run": (6, 2)}, width=GRID_WIDTH,
             extra_height=GRID_ROOM),
    ], [
        *stacked_prompt(),
        Node(12, "FluxGuidance", {"guidance": 3.5}, {"conditioning": (11, 0)}),
        Node(13, "ConditioningZeroOut", {}, {"conditioning": (11, 0)}, title="No negative (cfg 1)"),
    ], [
        Node(14, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        Node(15, "KSampler", FLUX_SAMPLE, {"model": (9, 0), "positive": (12, 0), "negative": (13, 0),
                                           "latent_image": (14, 0)}),
        Node(16, "VAEDecode", {}, {"samples": (15, 0), "vae": (3, 0)}),
        Node(17, "SaveImage", {"filename_prefix": "lora_lab_flux"}, {"images": (16, 0)}, extra_height=260),
    ]], colour="#3f7f4f"),
])
def separate_files_example(name: str, needs: str, note_text: str, unet: str, clip: str, clip_type: str, vae: str,
                           run_name: str, negative: str, sample: dict, latent_node: str) -> Example:
    """Dataset, Train LoRA and test groups over a diffusion model, one text encoder and a VAE in
    separate files (Z-Image's and FLUX.2's graphs): the grid and your sampler use the same
    classifier-free guidance and negative, so they agree."""
    return Example(name, opens_on=2, needs=needs, groups=[
        Group("1 · Dataset", [[
            note(8, note_text),
            Node(4, "LoraLabLoadDataset", {"folder": "my_dataset", "lora_type": "character",
                                           "trigger_word": "xyz_person"},
                 {"model": (1, 0)}, width=DATASET_WIDTH, extra_height=DATASET_SHEET_ROOM),
        ], [
            Node(1, "UNETLoader", {"unet_name": unet, "weight_dtype": "default"}),
            Node(2, "CLIPLoader", {"clip_name": clip, "type": clip_type}),
            Node(3, "VAELoader", {"vae_name": vae}),
            Node(5, "LoraLabCaption", {}, {"dataset": (4, 0), "model": (1, 0)}),
        ]]),
        Group("2 · Train", [[
            Node(6, "LoraLabTrainLora", {"name": run_name, "gradient_checkpointing": True},
                 {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "dataset": (5, 0)}, width=440),
        ]], colour="#8a6d3b"),
        Group("3 · Test", [[
            Node(7, "LoraLabSampleCheckpoint", {"prompts": "{trigger}, portrait photo in a garden\n{trigger}, as an "
                                                           "astronaut", "negative": negative, "cfg": sample["cfg"],
                                                "width": 1024, "height": 1024, "scheduler": sample["scheduler"]},
                 {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "training_run": (6, 2)}, width=GRID_WIDTH,
                 extra_height=GRID_ROOM),
        ], [
            *stacked_prompt(),
            Node(12, "CLIPTextEncode", {"text": negative}, {"clip": (9, 1)}, title="Negative"),
        ], [
            Node(14, latent_node, {"width": 1024, "height": 1024, "batch_size": 1}),
            Node(15, "KSampler", sample, {"model": (9, 0), "positive": (11, 0), "negative": (12, 0),
                                          "latent_image": (14, 0)}),
            Node(16, "VAEDecode", {}, {"samples": (15, 0), "vae": (3, 0)}),
            Node(17, "SaveImage", {"filename_prefix": f"lora_lab_{run_name.rsplit('_', 1)[-1]}"}, {"images": (16, 0)},
                 extra_height=260),
        ]], colour="#3f7f4f"),
    ])


# Z-Image as ComfyUI's own Z-Image templates load it (Comfy-Org/z_image: the diffusion model, Qwen3-4B
# through CLIPLoader's lumina2 type, FLUX.1's VAE). The base model trains (musubi-tuner's advice: the
# distilled Turbo loses its few-step sampling when trained directly) and samples with classifier-free
# guidance and a negative prompt.
TRAIN_ZIMAGE = separate_files_example(
    "Train a Z-Image LoRA", "0.3.76",
    "1. Put 20-50 photos with .txt captions in ComfyUI/input/my_dataset; pick the Z-Image model (z_image_bf16), "
    "qwen_3_4b (type lumina2) and ae.safetensors. Needs ComfyUI 0.3.76 or later.\n2. Z-Image likes long sentences: "
    "Caption (connected to the model) turns tags into them, the trigger word (typed once, on Load Dataset) "
    "first.\n3. Read the report on Load Dataset, then Queue (gradient checkpointing is on, to fit 24 GB GPUs).\n4. "
    "Test: Sample Checkpoint compares checkpoints and strengths; Apply LoRA Stack feeds your own sampler with the "
    "trigger word in front.",
    "z_image_bf16.safetensors", "qwen_3_4b.safetensors", "lumina2", "ae.safetensors", "xyz_person_zimage",
    negative="blurry, low quality", latent_node="EmptySD3LatentImage",
    sample={"seed": 0, "steps": 30, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple"})
# FLUX.2 [klein] 4B as ComfyUI's own Klein template loads it (Comfy-Org/flux2-klein: the base model,
# Qwen3-4B through CLIPLoader's flux2 type, FLUX.2's VAE). The base model trains (BFL: "Base ... for
# fine-tuning, LoRA training") and samples with classifier-free guidance (diffusers' and musubi-tuner's
# 4.0); its latents are FLUX.2's own 128-channel ones.
TRAIN_FLUX2 = separate_files_example(
    "Train a FLUX.2 Klein LoRA", "0.11",
    "1. Put 20-50 photos with .txt captions in ComfyUI/input/my_dataset; pick FLUX.2 [klein] base 4B, qwen_3_4b "
    "(type flux2) and flux2-vae. Needs ComfyUI 0.11 or later.\n2. FLUX.2 likes sentences: Caption (connected to the "
    "model) turns tags into them, the trigger word (typed once, on Load Dataset) first.\n3. Read the report on Load "
    "Dataset, then Queue (gradient checkpointing is on, to fit 16 GB GPUs).\n4. Test: Sample Checkpoint compares "
    "checkpoints and strengths; Apply LoRA Stack feeds your own sampler (cfg 4) with the trigger word in front.",
    "flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", "flux2", "flux2-vae.safetensors", "xyz_person_flux2",
    negative="", latent_node="EmptyFlux2LatentImage",
    sample={"seed": 0, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple"})
EXAMPLES = [TRAIN_AND_TEST, COMPARE_LORAS, STACK_TWO, TRAIN_FLUX, TRAIN_ZIMAGE, TRAIN_FLUX2]


def example_nodes(example: Example) -> list[Node]:
    return [node for group in example.groups for column in group.columns for node in column]


def missing_nodes(example: Example, object_info: dict) -> set[str]:
    """The example's node types a ComfyUI (its object info) does not have."""
    return {node.type for node in example_nodes(example)} - set(FRONTEND_ONLY_NODES) - set(object_info)


def intended_values(example: Example, object_info: dict) -> dict[int, dict[str, Any]]:
    """What each node's widgets should read once loaded: the example's values over the defaults
    (for the browser tests)."""
    from frontend_rules import default_value, widgets

    intended = {}
    for node in example_nodes(example):
        if node.type in FRONTEND_ONLY_NODES:
            continue
        info = object_info[node.type]
        intended[node.id] = {w.name: node.widgets.get(w.name, default_value(w, info)) for w in widgets(info)}
    return intended


# --- layout and the UI format -----------------------------------------------------------------------
def measure_sizes(url: str, types: set[str]) -> dict[str, tuple[float, float]]:
    """Each node type's size as the frontend computes it for a new node (widgets, DOM panels and all)."""
    from comfy_browser import launch, open_comfyui
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page, _ = open_comfyui(browser, url)
        sizes = page.evaluate("""(types) => Object.fromEntries(types.map((type) => {
            const node = window.LiteGraph.createNode(type);
            window.app.graph.add(node);
            const size = node.computeSize();
            window.app.graph.remove(node);
            return [type, [Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]];
        }))""", sorted(types))
        browser.close()
    return {type_: tuple(size) for type_, size in sizes.items()}


def layout(example: Example, sizes: dict[str, tuple[float, float]]) -> tuple[dict[int, tuple], list[dict]]:
    """(node id -> (pos, size)), groups: columns left to right, nodes stacked in each column."""
    placed: dict[int, tuple] = {}
    groups = []
    x = 40
    for group in example.groups:
        top = 40 + GROUP_TITLE + GROUP_PADDING
        group_left, bottom = x, top
        for column in group.columns:
            column_x = x + GROUP_PADDING
            width = max((node.width or sizes.get(node.type, NOTE_SIZE)[0]) for node in column)
            y = top
            for node in column:
                measured = NOTE_SIZE if node.type == NOTE else sizes[node.type]
                size = (max(width, measured[0]), measured[1] + node.extra_height)
                placed[node.id] = ((column_x, y + NODE_TITLE), size)
                y += NODE_TITLE + size[1] + GAP
            bottom = max(bottom, y - GAP)
            x = column_x + width + GAP
        right = x - GAP + GROUP_PADDING
        groups.append({"title": group.title, "bounding": [group_left, 40, right - group_left,
                                                          bottom + GROUP_PADDING - 40],
                       "color": group.colour, "font_size": 24})
        x = right + GAP
    return placed, groups


def to_ui(example: Example, object_info: dict, sizes: dict[str, tuple[float, float]]) -> dict:
    nodes, links = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    placed, groups = layout(example, sizes)
    all_nodes = example_nodes(example)
    history = widget_history()
    for order, node in enumerate(all_nodes):
        pos, size = placed[node.id]
        record: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(pos), "size": list(size),
                                  "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
                                  "properties": {}, "widgets_values": []}
        if node.title:
            record["title"] = node.title
        if node.type == NOTE:
            record.update(widgets_values=[node.widgets["text"]], color="#432", bgcolor="#653")
            nodes.append(record)
            continue
        info = object_info[node.type]
        record["properties"] = {"Node name for S&R": node.type}
        if node.type in history:  # the layout its widget values follow (web/widget_history.json)
            record["properties"]["lora_lab_layout"] = len(history[node.type]["layouts"])
        record["widgets_values"] = widgets_values(info, node.widgets)
        specs = [(n, s) for group in ("required", "optional") for n, s in info["input"].get(group, {}).items()]
        for name, spec in specs:
            if name not in node.links:
                continue
            source, slot = node.links[name]
            link = len(links) + 1
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            links.append([link, source, slot, node.id, len(record["inputs"]), kind])
            outgoing.setdefault((source, slot), []).append(link)
            entry = {"name": name, "type": kind, "link": link}
            if kind in WIDGET_TYPES:  # a widget fed by a link: the frontend keeps both
                entry["widget"] = {"name": name}
            record["inputs"].append(entry)
        nodes.append(record)
    for record, node in zip(nodes, all_nodes, strict=True):
        if node.type == NOTE:
            continue
        info = object_info[node.type]
        record["outputs"] = [{"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                              "links": outgoing.get((node.id, slot), []), "slot_index": slot}
                             for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": opening_view(example, groups)}, "version": 0.4}


def opening_view(example: Example, groups: list[dict]) -> dict:
    """The zoom and offset the example opens at: its first groups (the main path) as wide as a 1600 px
    screen shows them, top aligned, at 100 % at most, never below the 80 % at which text stays readable
    (the rest is a scroll away)."""
    shown = groups[:example.opens_on or len(groups)]
    left = min(g["bounding"][0] for g in shown) - 10
    top = min(g["bounding"][1] for g in shown) - 10
    right = max(g["bounding"][0] + g["bounding"][2] for g in shown) + 10
    scale = max(READABLE_ZOOM, min(1.0, (VIEWPORT[0] - CANVAS_LEFT - 2 * MARGIN) / (right - left)))
    return {"scale": round(scale, 3), "offset": [MARGIN / scale - left, MARGIN / scale - top]}


def example_path(example: Example) -> Path:
    return OUT / f"{example.name}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with LoRA Lab")
    args = parser.parse_args()
    with urllib.request.urlopen(f"{args.url}/object_info", timeout=60) as response:
        object_info = json.loads(response.read())
    # An example of a newer ComfyUI's family whose nodes this one lacks (FLUX.2's latent node before
    # 0.11) keeps its file.
    buildable = [example for example in EXAMPLES if not (example.needs and missing_nodes(example, object_info))]
    types = {node.type for example in buildable for node in example_nodes(example)} - set(FRONTEND_ONLY_NODES)
    sizes = measure_sizes(args.url, types)
    OUT.mkdir(exist_ok=True)
    for stale in set(OUT.glob("*.json")) - {example_path(example) for example in EXAMPLES}:
        stale.unlink()
    for example in EXAMPLES:
        if example not in buildable:
            print(f"kept {example_path(example).name}: this ComfyUI lacks some of its nodes")
            continue
        example_path(example).write_text(json.dumps(to_ui(example, object_info, sizes), indent=1) + "\n")
        print(f"wrote {example_path(example).name}")


if __name__ == "__main__":
    main()
