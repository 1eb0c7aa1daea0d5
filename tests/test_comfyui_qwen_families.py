"""Train LoRA's Z-Image and FLUX.2 [klein] paths against ComfyUI's own code (skipped unless
COMFYUI_DIR is set). Both families are conditioned by Qwen3-4B; each runs:

1. The diffusers transformer it trains is a view of ComfyUI's weights (fused q/k/v sliced, not
   copied) and predicts what ComfyUI's model predicts; weights ComfyUI holds in fp8 stay fp8
   (comfy_zimage_check.py, comfy_flux2_check.py).
2. The shipped example ("Train a Z-Image LoRA", "Train a FLUX.2 Klein LoRA"), as shipped but for
   file names and step counts, on the real server with an install ComfyUI loads as that family
   (comfy_server.zimage_install / flux2_install: Z-Image's transformer must be full width, 3840,
   with one main block; FLUX.2's may be narrow, ComfyUI reads its widths from the file; Qwen3-4B at
   full size in fp8 with random weights, ComfyUI's Qwen3 config being fixed; LORA_LAB_QWEN_MODELS
   names a folder that keeps the files between sessions). Train LoRA, Sample Checkpoint's grid and
   Apply LoRA Stack into the user's KSampler, each image checked against core nodes, with zero
   "lora key not loaded" lines.
3. On a ComfyUI older than the family, Train LoRA says which release it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .comfy_server import (
    REPO,
    ComfyServer,
    add_core_comparison,
    assert_matches_core_nodes,
    comfy_python,
    flux2_install,
    zimage_install,
)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
sys.path.insert(0, str(REPO / "scripts"))
from build_example_workflows import TRAIN_FLUX2, TRAIN_ZIMAGE, example_path  # noqa: E402
from frontend_rules import ui_to_api  # noqa: E402

# family -> (its example, its install, the check script, what in ComfyUI's source says it loads the family,
# the ComfyUI class an older ComfyUI gives such a model, the release named in the refusal)
FAMILIES = {
    "zimage": (TRAIN_ZIMAGE, zimage_install, "comfy_zimage_check.py", "class ZImage(", "Lumina2",
               "Z-Image (ComfyUI 0.3.76 or later)"),
    "flux2": (TRAIN_FLUX2, flux2_install, "comfy_flux2_check.py", "class Flux2(", "Flux",
              "FLUX.2 [klein] (ComfyUI 0.11 or later)"),
}


def comfy_loads(family: str) -> bool:
    source = Path(COMFYUI_DIR) / "comfy" / "supported_models.py" if COMFYUI_DIR else None
    return bool(source) and FAMILIES[family][3] in source.read_text()


def needs(family: str) -> None:
    if not comfy_loads(family):
        pytest.skip(f"this ComfyUI predates {family} ({FAMILIES[family][5]})")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_transformer_matches_comfyui(tmp_path, family):
    needs(family)
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    script = Path(__file__).with_name(FAMILIES[family][2])
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(script), COMFYUI_DIR, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(family, figures)
    assert figures["shares_storage"] and figures["max_difference"] < 1e-5 * max(1.0, figures["scale"])
    assert figures["fp8_layer"] == "Float8Linear" and figures["fp8_max_difference"] < 0.1 * figures["scale"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server per family, started on first use (each with its own install)."""
    started: dict[str, tuple[ComfyServer, dict[str, Path]]] = {}

    def server_for(family: str) -> tuple[ComfyServer, dict[str, Path]]:
        if family not in started:
            began = time.time()
            base = tmp_path_factory.mktemp(f"comfy_{family}")
            files = FAMILIES[family][1](base, os.environ.get("LORA_LAB_QWEN_MODELS"), tmp_path_factory.mktemp("models"))
            print(f"{family} files ready in {time.time() - began:.0f} s: "
                  + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in files.values()))
            server = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)))
            server.start()
            started[family] = (server, files)
        return started[family]

    yield server_for
    for server, _ in started.values():
        server.stop()


def shipped_prompt(server: ComfyServer, family: str, files: dict[str, Path]) -> dict:
    """The shipped example's API prompt with the test's file names and step counts (widget values
    only): 4 steps at 64 px, a grid of one shipped prompt at strengths 0 and 0.7 (the stack's), the
    user's sampler at 64 px and 2 steps."""
    prompt = ui_to_api(json.loads(example_path(FAMILIES[family][0]).read_text()), server.get("/object_info"))
    prompt["1"]["inputs"]["unet_name"] = files["transformer"].name
    prompt["2"]["inputs"]["clip_name"] = files["qwen"].name
    prompt["3"]["inputs"]["vae_name"] = files["vae"].name
    prompt["6"]["inputs"].update(steps=4, save_every=2, resolution=64, name=f"{family}_example")
    shipped = prompt["7"]["inputs"]["prompts"].splitlines()[0]
    prompt["7"]["inputs"].update(prompts=shipped, strengths="0, 0.7", width=64, height=64, steps=2)
    prompt["14"]["inputs"].update(width=64, height=64)
    prompt["15"]["inputs"].update(steps=2)
    return prompt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shipped_example_trains_samples_and_loads(servers, family):
    """The example as shipped: Caption's sentences, Train LoRA, Sample Checkpoint, Apply LoRA Stack
    into the user's KSampler; beside it, core nodes sampling the same conditioning on the base and
    through core LoraLoaderModelOnly."""
    needs(family)
    server, files = servers(family)
    prompt = shipped_prompt(server, family, files)
    assert prompt["9"]["inputs"]["run_strength"] == 0.7
    assert prompt["7"]["inputs"]["negative"] == prompt["12"]["inputs"]["text"]  # the grid samples as the user does
    add_core_comparison(prompt, {"positive": ["11", 0], "negative": ["12", 0], "latent_image": ["14", 0]})
    started: list[tuple[str, float]] = []

    def watch(_, message):
        if message["type"] == "executing" and message["data"].get("node"):
            started.append((message["data"]["node"], time.time()))

    queued = time.time()
    prompt_id, _ = server.run(prompt, on_message=watch, timeout=3000)
    wall = time.time() - queued
    ended = [when for _, when in started[1:]] + [queued + wall]
    print(f"{family} seconds per node:",
          {node: round(end - when) for (node, when), end in zip(started, ended, strict=True)})
    log = server.log()
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", log[-3000:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    print(f"{family} training:", [line for line in log.splitlines() if "Memory estimate" in line or "s/step" in line])

    assert_matches_core_nodes(server, prompt_id)
    print(f"{family} example on the server: {wall:.0f} s")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_older_comfyui_is_told_which_release_trains_the_family(tmp_path, family):
    """ComfyUI 0.3.64 has no Z-Image or FLUX.2 class: the model it makes of such a file is refused,
    naming the release that trains it."""
    if comfy_loads(family):
        pytest.skip(f"this ComfyUI loads {family}")
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    older = FAMILIES[family][4]
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), "-c", (
        "import sys, types; sys.path[:0] = [sys.argv[1], sys.argv[2]]; sys.argv = sys.argv[:1] + ['--cpu'];"
        "import comfy.options; comfy.options.enable_args_parsing(); import comfy.supported_models as m;"
        "from lora_lab.nodes.graph_model import family_of;"
        f"config = m.{older}(dict(m.{older}.unet_config, in_channels=128));"
        "family_of(types.SimpleNamespace(model=types.SimpleNamespace(model_config=config)))"),
        COMFYUI_DIR, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert FAMILIES[family][5] in result.stderr, result.stderr[-2000:]
    assert f"this graph's model is {older} (ComfyUI version " in result.stderr
