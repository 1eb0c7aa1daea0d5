"""Train LoRA's Z-Image path against ComfyUI's own Z-Image code (skipped unless COMFYUI_DIR is set).

1. The diffusers transformer it trains is a view of ComfyUI's weights (fused q/k/v sliced, not
   copied) and predicts what ComfyUI's model predicts; weights ComfyUI holds in fp8 stay fp8.
2. The shipped "Train a Z-Image LoRA" example, as shipped but for file names and step counts, on
   the real server with a Z-Image install ComfyUI loads as Z-Image: a full-width transformer of
   one main block (ComfyUI reads only the block count from the file; the width must be Z-Image's
   3840), the full-size Qwen3-4B in fp8 with random weights (ComfyUI's Qwen3 config is fixed) and
   FLUX.1's VAE (comfy_server.zimage_install: about 70 s and 6 GB of disk, once; LORA_LAB_ZIMAGE_MODELS
   names a folder that keeps them between sessions). Train LoRA, Sample Checkpoint's grid and
   Apply LoRA Stack into the user's KSampler, each image checked against core nodes, with zero
   "lora key not loaded" lines.
3. On a ComfyUI older than Z-Image (0.3.64), Train LoRA says which release it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .comfy_server import REPO, ComfyServer, comfy_python, output_images, zimage_install

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
sys.path.insert(0, str(REPO / "scripts"))
from build_example_workflows import TRAIN_ZIMAGE, example_path  # noqa: E402
from frontend_rules import ui_to_api  # noqa: E402


def comfy_has_zimage() -> bool:
    return "class ZImage(" in (Path(COMFYUI_DIR) / "comfy" / "supported_models.py").read_text()


needs_zimage = pytest.mark.skipif(not COMFYUI_DIR or not comfy_has_zimage(),
                                  reason="this ComfyUI predates Z-Image (0.3.76 or later maps its LoRA keys)")


@needs_zimage
def test_shared_zimage_transformer_matches_comfyui(tmp_path):
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(Path(__file__).with_name("comfy_zimage_check.py")),
                             COMFYUI_DIR, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["shares_storage"] and figures["max_difference"] < 1e-5 * max(1.0, figures["scale"])
    assert figures["fp8_layer"] == "Float8Linear" and figures["fp8_max_difference"] < 0.1 * figures["scale"]


@pytest.fixture(scope="module")
def zimage_server(tmp_path_factory):
    started = time.time()
    base = tmp_path_factory.mktemp("comfy_zimage")
    files = zimage_install(base, os.environ.get("LORA_LAB_ZIMAGE_MODELS"), tmp_path_factory.mktemp("zimage_models"))
    print(f"Z-Image files ready in {time.time() - started:.0f} s: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in files.values()))
    comfy = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)))
    comfy.start()
    yield comfy, files
    comfy.stop()


def shipped_zimage_prompt(server: ComfyServer, files: dict[str, Path]) -> dict:
    """The shipped example's API prompt with the test's file names and step counts (widget values
    only): 4 steps at 64 px, a grid of one shipped prompt at strengths 0 and 0.7 (the stack's), the
    user's sampler at 64 px and 2 steps."""
    prompt = ui_to_api(json.loads(example_path(TRAIN_ZIMAGE).read_text()), server.get("/object_info"))
    prompt["1"]["inputs"]["unet_name"] = files["transformer"].name
    prompt["2"]["inputs"]["clip_name"] = files["qwen"].name
    assert prompt["2"]["inputs"]["type"] == "lumina2" and prompt["3"]["inputs"]["vae_name"] == files["vae"].name
    prompt["6"]["inputs"].update(steps=4, save_every=2, resolution=64, name="zimage_example")
    shipped_prompt = prompt["7"]["inputs"]["prompts"].splitlines()[0]
    prompt["7"]["inputs"].update(prompts=shipped_prompt, strengths="0, 0.7", width=64, height=64, steps=2)
    prompt["14"]["inputs"].update(width=64, height=64)
    prompt["15"]["inputs"].update(steps=2)
    return prompt


@needs_zimage
def test_shipped_zimage_example_trains_samples_and_loads(zimage_server):
    """The example as shipped: Caption's sentences, Train LoRA, Sample Checkpoint, Apply LoRA Stack
    into the user's KSampler; beside it, core nodes sampling the same conditioning on the base and
    through core LoraLoaderModelOnly."""
    server, files = zimage_server
    prompt = shipped_zimage_prompt(server, files)
    assert prompt["9"]["inputs"]["run_strength"] == 0.7
    assert prompt["7"]["inputs"]["negative"] == prompt["12"]["inputs"]["text"]  # the grid samples as the user does
    sampler = {key: prompt["15"]["inputs"][key] for key in ("seed", "steps", "cfg", "sampler_name", "scheduler",
                                                            "denoise")}
    conditioning = {"positive": ["11", 0], "negative": ["12", 0], "latent_image": ["14", 0]}
    prompt.update({
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
        "25": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **conditioning, **sampler}},
        "26": {"class_type": "VAEDecode", "inputs": {"samples": ["25", 0], "vae": ["3", 0]}},
        "27": {"class_type": "PreviewImage", "inputs": {"images": ["26", 0]}},
        "28": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": ["6", 4],
                                                               "strength_model": 0.7}},
        "29": {"class_type": "KSampler", "inputs": {"model": ["28", 0], **conditioning, **sampler}},
        "30": {"class_type": "VAEDecode", "inputs": {"samples": ["29", 0], "vae": ["3", 0]}},
        "31": {"class_type": "PreviewImage", "inputs": {"images": ["30", 0]}},
    })
    started: list[tuple[str, float]] = []

    def watch(_, message):
        if message["type"] == "executing" and message["data"].get("node"):
            started.append((message["data"]["node"], time.time()))

    queued = time.time()
    prompt_id, _ = server.run(prompt, on_message=watch, timeout=3000)
    wall = time.time() - queued
    ended = [when for _, when in started[1:]] + [queued + wall]
    print("seconds per node:", {node: round(end - when) for (node, when), end in zip(started, ended, strict=True)})
    log = server.log()
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", log[-3000:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log

    cells = output_images(server, prompt_id, "20")
    base = output_images(server, prompt_id, "27")[0]
    with_lora = output_images(server, prompt_id, "31")[0]
    through_stack = output_images(server, prompt_id, "17")[0]  # the example's own SaveImage
    assert len(cells) == 4  # rows step 2 and step 4, columns strength 0 and 0.7
    assert np.array_equal(cells[0], base) and np.array_equal(cells[2], base), "strength 0 is not the base image"
    assert not np.array_equal(with_lora, base), "the LoRA changed nothing"
    assert np.array_equal(through_stack, with_lora), "Apply LoRA Stack differs from core LoraLoaderModelOnly"
    assert np.array_equal(cells[3], with_lora), "the last cell is not what LoraLoader makes of the final file"
    print(f"Z-Image example on the server: {wall:.0f} s")


@pytest.mark.skipif(not COMFYUI_DIR or comfy_has_zimage(), reason="this ComfyUI loads Z-Image")
def test_an_older_comfyui_is_told_which_release_trains_zimage(tmp_path):
    """ComfyUI 0.3.64 has no Z-Image class: a graph's Lumina 2 model is refused naming the release."""
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), "-c", (
        "import sys, types; sys.path[:0] = [sys.argv[1], sys.argv[2]]; sys.argv = sys.argv[:1] + ['--cpu'];"
        "import comfy.options; comfy.options.enable_args_parsing(); import comfy.supported_models as m;"
        "from lora_lab.nodes.graph_model import family_of;"
        "config = m.Lumina2(dict(m.Lumina2.unet_config));"
        "family_of(types.SimpleNamespace(model=types.SimpleNamespace(model_config=config)))"),
        COMFYUI_DIR, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "Z-Image (ComfyUI 0.3.76 or later)" in result.stderr, result.stderr[-2000:]
    assert "this graph's model is Lumina2 (ComfyUI version 0.3.64)" in result.stderr
