"""Train LoRA's FLUX path against ComfyUI's own FLUX code (skipped unless COMFYUI_DIR is set).

1. The diffusers transformer it trains is a view of ComfyUI's weights (fused q/k/v sliced, not
   copied) and computes what ComfyUI computes; weights ComfyUI holds in fp8 stay fp8.
2. The shipped "Train a FLUX.1-dev LoRA" example, as shipped but for file names and step counts,
   on the real server with a FLUX install ComfyUI loads as FLUX: a full-width transformer of one
   double and one single block, CLIP-L, the full-size T5-XXL in fp8 with random weights (ComfyUI's
   FLUX text encoder takes no smaller one) and the FLUX VAE (comfy_server.flux_install: about
   80 s and 6.3 GB of disk, once per session; LORA_LAB_FLUX_MODELS names a folder that keeps them
   between sessions). Train LoRA, Sample Checkpoint's grid and Apply LoRA Stack into the user's
   FluxGuidance/KSampler, each image checked against core nodes.
3. Cancel saves, and resume = latest continues to the LoRA an unbroken run makes, bit for bit.
4. Background training makes that same LoRA.
One T5 encode takes 20-45 s on 2 cores (each training run encodes its two captions): 10-20 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from .comfy_server import REPO, ComfyServer, add_core_comparison, assert_matches_core_nodes, comfy_python, flux_install

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
sys.path.insert(0, str(REPO / "scripts"))
from build_example_workflows import TRAIN_FLUX, example_path  # noqa: E402
from frontend_rules import ui_to_api  # noqa: E402

GIB = 2**30
# What the server's memory may rise during training beyond the trainer's own estimate of what
# training adds (the allocator's arenas, the optimizer's first state): under the 0.51 GiB of the
# test transformer held in fp8, so a copy of it is caught.
RSS_MARGIN = 0.3 * GIB


def test_shared_flux_transformer_matches_comfyui(tmp_path):
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(Path(__file__).with_name("comfy_flux_check.py")),
                             COMFYUI_DIR, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["shares_storage"] and figures["max_difference"] < 1e-5
    assert figures["fp8_layer"] == "Float8Linear" and figures["fp8_max_difference"] < 0.1 * figures["scale"]


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    started = time.time()
    base = tmp_path_factory.mktemp("comfy_flux")
    files = flux_install(base, os.environ.get("LORA_LAB_FLUX_MODELS"), tmp_path_factory.mktemp("flux_models"))
    print(f"FLUX files ready in {time.time() - started:.0f} s: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in files.values()))
    comfy = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)))
    comfy.start()
    yield comfy, files
    comfy.stop()


def server_rss(server: ComfyServer) -> int:
    """The server's resident memory in bytes, from Linux's /proc (no psutil needed)."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024


def shipped_flux_prompt(server: ComfyServer, files: dict[str, Path]) -> dict:
    """The shipped example's API prompt with the test's file names and step counts (widget values
    only): 4 steps at 64 px, a grid of one shipped prompt at strengths 0 and 0.7 (the stack's), the
    user's sampler at 64 px and 2 steps."""
    prompt = ui_to_api(json.loads(example_path(TRAIN_FLUX).read_text()), server.get("/object_info"))
    assert prompt["1"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    prompt["1"]["inputs"]["unet_name"] = files["transformer"].name
    prompt["2"]["inputs"].update(clip_name1=files["clip_l"].name, clip_name2=files["t5"].name)
    prompt["6"]["inputs"].update(steps=4, save_every=2, resolution=64, name="flux_example")
    shipped_prompt = prompt["7"]["inputs"]["prompts"].splitlines()[0]
    prompt["7"]["inputs"].update(prompts=shipped_prompt, strengths="0, 0.7", width=64, height=64, steps=2)
    prompt["14"]["inputs"].update(width=64, height=64)
    prompt["15"]["inputs"].update(steps=2)
    return prompt


def test_shipped_flux_example_trains_samples_and_loads(flux_server):
    """The example as shipped: fp8 transformer, Caption's sentences, Train LoRA, Sample Checkpoint
    with FLUX guidance, Apply LoRA Stack into the user's FluxGuidance/KSampler; beside it, core
    nodes sampling the same conditioning on the base and through core LoraLoaderModelOnly."""
    server, files = flux_server
    prompt = shipped_flux_prompt(server, files)
    assert prompt["9"]["inputs"]["run_strength"] == 0.7 and prompt["15"]["inputs"]["cfg"] == 1.0
    add_core_comparison(prompt, {"positive": ["12", 0], "negative": ["13", 0], "latent_image": ["14", 0]})
    rss = {"peak": 0}
    phase = {"training": False}
    started: list[tuple[str, float]] = []  # (node, when it began executing): seconds per node for the note

    def watch(_, message):
        if message["type"] == "lora_lab.start":
            rss["start"], phase["training"] = server_rss(server), True
        elif message["type"] == "lora_lab.phase":  # the first preview ends the window of pure training steps
            phase["training"] = False
        elif message["type"] == "executing" and message["data"].get("node"):
            started.append((message["data"]["node"], time.time()))

    def poll() -> None:
        while not rss.get("done"):
            if phase["training"]:
                rss["peak"] = max(rss["peak"], server_rss(server))
            time.sleep(0.1)

    threading.Thread(target=poll, daemon=True).start()
    queued = time.time()
    prompt_id, messages = server.run(prompt, on_message=watch, timeout=2400)
    rss["done"], wall = True, time.time() - queued
    ended = [when for _, when in started[1:]] + [queued + wall]
    print("seconds per node:", {node: round(end - when) for (node, when), end in zip(started, ended, strict=True)})
    log = server.log()
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", log[-3000:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log

    assert_matches_core_nodes(server, prompt_id)

    estimate = re.findall(r"Memory estimate: base model ([\d.]+) \+ LoRA ([\d.]+) \+ optimizer ([\d.]+) \+ one step "
                          r"([\d.]+)", log)[-1]
    base_model, lora, optimizer, step = (float(x) * GIB for x in estimate)
    rise = rss["peak"] - rss["start"]
    timings = {"wall_s": round(wall), "rss_at_start_gib": round(rss["start"] / GIB, 2),
               "training_rise_gib": round(rise / GIB, 3), "estimate_gib": round((lora + optimizer + step) / GIB, 3),
               "base_model_gib": round(base_model / GIB, 2)}
    print("FLUX example on the server:", timings)
    assert base_model > RSS_MARGIN  # a copy of the transformer would not fit in the margin
    assert rise < lora + optimizer + step + RSS_MARGIN, f"the shared transformer was copied? {timings}"


def training_only(prompt: dict, **settings) -> dict:
    """The example's dataset and Train LoRA nodes alone, with these Train LoRA settings (no samples:
    samples never change what trains, and each would be a T5 encode)."""
    kept = {key: json.loads(json.dumps(prompt[key])) for key in ("1", "2", "3", "4", "5", "6")}
    kept["6"]["inputs"].update(sample_every=-1, **settings)
    return kept


def final_lora(server: ComfyServer, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(server.base / "models" / "loras" / "lora_lab" / name / f"{name}.safetensors")


def assert_same_lora(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours), "not bit-identical"


@pytest.fixture(scope="module")
def unbroken(flux_server) -> dict:
    """The example's Train LoRA settings, trained through in one go (without samples)."""
    server, files = flux_server
    prompt_id, _ = server.run(training_only(shipped_flux_prompt(server, files), name="flux_unbroken"), timeout=1800)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    return final_lora(server, "flux_unbroken")


def test_flux_cancel_saves_and_resume_latest_continues_exactly(flux_server, unbroken):
    server, files = flux_server
    prompt = training_only(shipped_flux_prompt(server, files), name="flux_cancel")
    interrupted = []

    def cancel_after_the_first_step(comfy, message):
        if message["type"] == "lora_lab.progress" and not interrupted:
            interrupted.append(comfy.post("/interrupt", {}))

    _, messages = server.run(prompt, on_message=cancel_after_the_first_step, timeout=1800)
    assert any(m["type"] == "execution_interrupted" for m in messages)
    run_dir = server.base / "models" / "loras" / "lora_lab" / "flux_cancel"
    saved = sorted(run_dir.glob("flux_cancel-step*.safetensors"))
    assert saved and saved[-1].with_suffix(".resume").is_file()
    step = int(saved[-1].stem.rsplit("step", 1)[1])
    assert step < 4, "Cancel did not stop the run"
    prompt["6"]["inputs"]["resume"] = "latest"
    prompt_id, messages = server.run(prompt, timeout=1800)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    assert [m["data"]["step"] for m in messages if m["type"] == "lora_lab.progress"] == list(range(step + 1, 5))
    assert_same_lora(final_lora(server, "flux_cancel"), unbroken)
    print(f"FLUX Cancel at step {step}, resumed to 4: bit-identical to the unbroken run")


def test_flux_trains_in_the_background_as_in_the_foreground(flux_server, unbroken):
    server, files = flux_server
    queued = time.time()
    prompt_id, _ = server.run(training_only(shipped_flux_prompt(server, files), name="flux_bg", background=True))
    returned = time.time() - queued
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    deadline = time.time() + 1800
    while time.time() < deadline:
        job = next((j for j in server.get("/lora_lab/jobs")["jobs"] if j["name"] == "flux_bg"), None)
        if job and job["status"] not in ("starting", "training", "paused", "stopping"):
            break
        time.sleep(1)
    assert job and job["status"] == "finished", job
    assert_same_lora(final_lora(server, "flux_bg"), unbroken)
    print(f"FLUX background: Train LoRA returned in {returned:.0f} s; the job's LoRA equals the foreground run's")
