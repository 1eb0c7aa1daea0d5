"""LoRA Lab inside a real ComfyUI server (CPU), with random SD 1.5, SDXL and FLUX models built
here (see comfy_server.py).

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (its Python: COMFYUI_PYTHON, default the
`python` on PATH; it needs ComfyUI's requirements plus diffusers and peft). Runs an API twin of
example workflow (a) at 64 px, compares Compare LoRA Stack's cells with chained core LoraLoaders,
interrupts and resumes a run, trains SDXL through the nodes, and loads a FLUX LoRA from LoRA Lab's
exporter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_lab.trainer import embedded
from lora_lab.trainer.files import read_metadata
from safetensors.torch import save_file

from .comfy_server import (
    REPO,
    ComfyServer,
    build_flux_model_and_lora,
    build_sd15_checkpoint,
    build_sdxl_checkpoint,
    comfy_python,
    output_images,
    small_training,
    train_settings,
    training_graph,
)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
sys.path.insert(0, str(REPO / "scripts"))
from build_example_workflows import EXAMPLES, TRAIN_AND_TEST, example_path  # noqa: E402
from frontend_rules import FRONTEND_ONLY_NODES, default_value, ui_to_api, widgets  # noqa: E402

CHECKPOINT = "random_sd15.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "models" / "checkpoints").mkdir(parents=True)
    build_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    shutil.copytree(embedded.CONCEPT_DATASET, base / "input" / "concept")
    comfy = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)))
    started = time.time()
    comfy.start()
    print(f"server started in {time.time() - started:.0f} s")
    yield comfy
    comfy.stop()


def test_examples_load_with_no_missing_node_types(server):
    object_info = server.get("/object_info")
    shipped = sorted((REPO / "example_workflows").glob("*.json"))
    assert shipped == sorted(example_path(example) for example in EXAMPLES)
    for example in EXAMPLES:
        path = example_path(example)
        workflow = json.loads(path.read_text())
        missing = {node["type"] for node in workflow["nodes"]} - set(object_info) - set(FRONTEND_ONLY_NODES)
        if missing and example.needs:  # a newer ComfyUI's family (FLUX.2's latent node arrived in 0.11)
            print(f"{path.name} needs ComfyUI {example.needs}: this one has no {', '.join(sorted(missing))}")
            continue
        assert not missing, f"{path.name}: {missing}"
        ui_to_api(workflow, object_info)  # every widget value lines up with its widget, control slots included
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"


def test_train_sample_and_apply_in_one_graph(server):
    object_info = server.get("/object_info")
    prompt = ui_to_api(json.loads(example_path(TRAIN_AND_TEST).read_text()), object_info)
    prompt["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    prompt["2"]["inputs"].update(folder="concept", trigger_word="zkw_toy")
    prompt["3"]["inputs"].update(trigger_word="zkw_toy")
    prompt["4"]["inputs"].update(steps=6, save_every=3, resolution=64, batch_size=2, rank=4, learning_rate=0.01,
                                 name="server_test")
    sample = dict(seed=0, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    prompt["5"]["inputs"].update(prompts="{trigger}", strengths="0, 1", width=64, height=64, **sample)
    prompt["9"]["inputs"].update(width=64, height=64)
    prompt["10"]["inputs"].update(**sample)
    # A plain KSampler on the base model, with the settings of Sample Checkpoint's cells.
    prompt.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": "zkw_toy", "clip": ["1", 1]}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "23": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["20", 0], "negative": ["21", 0],
                                                    "latent_image": ["22", 0], "denoise": 1.0, **sample}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "PreviewImage", "inputs": {"images": ["24", 0]}},
        "26": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
        # Train LoRA's lora_name output feeds core LoraLoader (the server checks the link's types).
        "27": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["4", 4],
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "28": {"class_type": "KSampler", "inputs": {"model": ["27", 0], "positive": ["20", 0], "negative": ["21", 0],
                                                    "latent_image": ["22", 0], "denoise": 1.0, **sample}},
        "29": {"class_type": "VAEDecode", "inputs": {"samples": ["28", 0], "vae": ["1", 2]}},
        "30": {"class_type": "PreviewImage", "inputs": {"images": ["29", 0]}},
    })
    queued = time.time()
    first_step: list[float] = []

    def note_first_step(_, message):
        if message["type"] == "lora_lab.progress" and not first_step:
            first_step.append(time.time())

    prompt_id, messages = server.run(prompt, on_message=note_first_step)
    wall = time.time() - queued
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", server.log()[-3000:]
    progress = [m for m in messages if m["type"] == "lora_lab.progress"]
    assert [m["data"]["step"] for m in progress] == [1, 2, 3, 4, 5, 6]
    assert any(m["type"] == "progress" and m["data"].get("node") == "4" for m in messages)
    run_dir = server.base / "models" / "loras" / "lora_lab" / "server_test"
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["server_test-step000003.safetensors",
                                                                      "server_test.safetensors"]
    log = server.log()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    base_image = output_images(server, prompt_id, "25")[0]
    cells = output_images(server, prompt_id, "26")  # step 3 at 0 and 1, final at 0 and 1
    assert len(cells) == 4
    assert np.array_equal(cells[0], base_image) and np.array_equal(cells[2], base_image)
    through_lora_loader = output_images(server, prompt_id, "30")[0]  # the final LoRA at 1, as cell 4
    assert np.array_equal(through_lora_loader, cells[3])
    # A few steps on a random model change the image only a little, but they must change it.
    assert np.abs(cells[3] - base_image).mean() > 0.1 and not np.array_equal(cells[1], base_image)
    print(f"workflow (a) wall {wall:.1f} s; queue to first training step {first_step[0] - queued:.1f} s")
    _, again = server.run(prompt)  # an identical re-queue must not retrain
    assert not any(m["type"] == "lora_lab.progress" for m in again)
    assert sorted(p.name for p in (run_dir.parent).iterdir()) == ["server_test"]


def test_the_data_features_train_through_the_nodes(server):
    """A second Load Dataset (lora_type regularisation) into reg_dataset, masks beside the images,
    masked loss, every augmentation and two resolutions, queued as an API prompt: the run trains
    a regularisation batch beside every step, says its step mix and cache hit rate, and its LoRA
    loads in core LoraLoader with every key; queueing again hands it on."""
    import random

    from lora_lab.trainer.embedded import synthetic
    from PIL import Image

    rng = random.Random(3)
    reg, masked = server.base / "input" / "class_images", server.base / "input" / "masked_concept"
    shutil.copytree(embedded.CONCEPT_DATASET, masked)
    for path in masked.rglob("toy_*.png"):
        mask = Image.new("L", Image.open(path).size, 0)
        mask.paste(255, (8, 8, mask.width - 8, mask.height - 8))
        mask.save(path.with_name(path.stem + "_mask.png"))
    reg.mkdir()
    for index in range(12):
        image, caption = synthetic.base_sample(rng)
        image.save(reg / f"class_{index:02d}.png")
        (reg / f"class_{index:02d}.txt").write_text(caption)
    settings = {**train_settings(steps=4, save_every=4, resolution=64, batch_size=2, rank=4, name="data_features"),
                "prior_loss_weight": 0.5, "masked_loss": True, "flip_augment": True, "color_jitter": 0.1,
                "random_crop": True, "resolutions": "32,64"}
    prompt = training_graph(CHECKPOINT, settings, trigger="zkw_toy")
    prompt["2"]["inputs"]["folder"] = "masked_concept"
    prompt["20"] = {"class_type": "LoraLabLoadDataset", "inputs": {"folder": "class_images",
                                                                  "lora_type": "regularisation",
                                                                  "trigger_word": "zkw_toy", "captions": ""}}
    train = "3"
    prompt[train]["inputs"]["reg_dataset"] = ["20", 0]
    prompt["21"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": [train, 4], "strength_model": 1.0,
                                                          "strength_clip": 1.0}}
    prompt["22"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "zkw_toy", "clip": ["21", 1]}}
    prompt["23"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["22", 0]}}
    prompt["24"] = {"class_type": "PreviewImage", "inputs": {"images": [train, 3]}}  # an output, so all of it runs
    prompt_id, messages = server.run(prompt)
    history = server.get(f"/history/{prompt_id}")[prompt_id]
    assert history["status"]["status_str"] == "success", server.log()[-3000:]
    assert "lora key not loaded" not in server.log() and "NOT LOADED" not in server.log()
    finished = [m["data"] for m in messages if m["type"] == "lora_lab.status" and m["data"].get("status") == "finished"]
    assert finished and "Step mix: 32 px 50%, 64 px 50%" in finished[-1]["message"]
    assert "cache hit rate" in finished[-1]["message"]
    report = history["outputs"]["20"]["text"][0]
    assert report.startswith("Regularisation images (12)")
    run_dir = server.base / "models" / "loras" / "lora_lab" / "data_features"
    metadata = json.loads(read_metadata(run_dir / "data_features.safetensors")["lora_lab.config"])["data"]
    assert (metadata["reg_dataset"], metadata["prior_loss_weight"], metadata["masked_loss"]) == (
        "class_images", 0.5, True)
    assert metadata["resolutions"] == [32, 64] and metadata["flip_augment"] and metadata["random_crop"]
    _, again = server.run(prompt)  # the same graph again: handed on, not retrained
    assert not any(m["type"] == "lora_lab.progress" for m in again)


def test_sample_checkpoint_overhead_per_cell(server):
    """Not a pass/fail timing: prints Sample Checkpoint's time per cell next to a plain KSampler's."""
    lora = "lora_lab/server_test/server_test.safetensors"
    sample = dict(seed=1, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal")
    grid = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "2": {"class_type": "LoraLabSampleCheckpoint", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": "a\nb", "negative": "",
                "strengths": "0.5, 1", "width": 64, "height": 64, "lora_names": lora, **sample}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    plain = {"1": grid["1"],
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                          "strength_model": 0.7, "strength_clip": 0.7}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "c", "clip": ["2", 1]}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                        "latent_image": ["5", 0], "denoise": 1.0, **sample}},
             "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
             "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    times = []
    for prompt in (plain, grid):
        before = len(re.findall(r"Prompt executed in ([\d.]+) seconds", server.log()))
        prompt_id, _ = server.run(prompt)
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"
        time.sleep(0.5)
        times.append(float(re.findall(r"Prompt executed in ([\d.]+) seconds", server.log())[before]))
    print(f"plain LoraLoader+KSampler {times[0]:.2f} s per image; Sample Checkpoint {times[1] / 4:.2f} s per cell")


def test_cancel_saves_a_checkpoint_and_resume_continues_it(server):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
              "2": {"class_type": "LoraLabLoadDataset", "inputs": {"folder": "concept", "lora_type": "object",
                                                                   "trigger_word": "", "model": ["1", 0]}},
              "3": {"class_type": "LoraLabTrainLora", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "preset": "none",
                  "steps": 30, "rank": 4, "alpha": 0.0, "learning_rate": 0.0, "resolution": 64, "batch_size": 1,
                  "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "save_every": 20,
                  "seed": 1, "name": "cancelled", "gradient_checkpointing": False, "mixed_precision": "auto",
                  "min_snr_gamma": 0.0, "noise_offset": 0.0, "bucketing": True, "resume": "off",
                  "resume_with_changes": False, "sample_every": -1, "prompts": "{trigger}",
                  "validation_images": -1}}}
    interrupted = []

    def cancel_after_three_steps(comfy, message):
        if message["type"] == "lora_lab.progress" and message["data"]["step"] == 3 and not interrupted:
            interrupted.append(comfy.post("/interrupt", {}))

    _, messages = server.run(prompt, on_message=cancel_after_three_steps)
    assert any(m["type"] == "execution_interrupted" for m in messages)
    run_dir = server.base / "models" / "loras" / "lora_lab" / "cancelled"
    saved = sorted(run_dir.glob("cancelled-step*.safetensors"))
    assert len(saved) == 1 and saved[0].with_suffix(".resume").is_file()
    step = int(saved[0].stem.rsplit("step", 1)[1])
    assert 3 <= step <= 5  # within a step or two of the Cancel
    stopped = next(m for m in messages if m["type"] == "lora_lab.status" and m["data"]["status"] == "stopped")
    assert "set resume to 'latest'" in stopped["data"]["message"] and stopped["data"]["run"] == "cancelled"
    # Queue again with resume = latest: training continues at the next step and finishes.
    prompt["3"]["inputs"]["resume"] = "latest"
    prompt_id, messages = server.run(prompt)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    steps = [m["data"]["step"] for m in messages if m["type"] == "lora_lab.progress"]
    assert steps == list(range(step + 1, 31))
    assert (run_dir / "cancelled.safetensors").is_file() and (run_dir / "cancelled-step000020.safetensors").is_file()
    # The resumed run knows the checkpoint saved at Cancel too: the journal, the run route and the
    # training_run value that Sample Checkpoint's "all" and the recommendation choose from.
    listed = [c["step"] for c in server.get("/lora_lab/run?name=cancelled")["run"]["checkpoints"]]
    assert listed == [step, 20, 30]
    started = next(m for m in messages if m["type"] == "lora_lab.start")["data"]
    assert started["first_step"] == step + 1 and [c["step"] for c in started["checkpoints"]] == [step]


def core_sample(model: list, clip: list, first: int, text: str, negative: str, latent: list, sample: dict) -> dict:
    """Core CLIPTextEncode → KSampler → VAEDecode → PreviewImage on `model`/`clip`, as nodes `first`
    to `first + 4` (the preview is `first + 4`)."""
    return {str(first): {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}},
            str(first + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}},
            str(first + 2): {"class_type": "KSampler", "inputs": {
                "model": model, "positive": [str(first), 0], "negative": [str(first + 1), 0],
                "latent_image": latent, "denoise": 1.0, **sample}},
            str(first + 3): {"class_type": "VAEDecode", "inputs": {"samples": [str(first + 2), 0], "vae": ["1", 2]}},
            str(first + 4): {"class_type": "PreviewImage", "inputs": {"images": [str(first + 3), 0]}}}


def test_compare_lora_stack_cells_equal_chained_core_lora_loaders(server):
    """Every cell of the stacking grid is what core LoraLoaders chained in stack order, CLIPTextEncode
    and KSampler make with the same settings and seed, pixel for pixel; the third LoRA is under
    every cell but the last row, which holds the base and the first LoRA alone."""
    for name, trigger, seed in (("stack_a", "zkw_ring", 1), ("stack_b", "zkw_blue", 2)):
        prompt_id, _ = server.run(small_training(CHECKPOINT, name, trigger, seed))
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"
    since = len(server.log())
    a, b = "lora_lab/stack_a/stack_a.safetensors", "lora_lab/stack_b/stack_b.safetensors"
    c = "lora_lab/stack_a/stack_a-step000003.safetensors"  # a third LoRA, clip strength unlike its model's
    sample = dict(seed=3, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    slots = {}
    for n, (name, model_strength, clip_strength) in enumerate(((a, 0.7, 0.7), (b, 0.5, 0.5), (c, 0.35, 0.2)), 1):
        slots.update({f"lora_{n}": name, f"model_strength_{n}": model_strength, f"clip_strength_{n}": clip_strength,
                      f"enabled_{n}": True})
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
              "2": {"class_type": "LoraLabApplyLoraStack", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                      "auto_strengths": False, **slots}},
              "3": {"class_type": "LoraLabCompareLoraStack", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_stack": ["2", 2],
                  "prompts": "{trigger}, a cat", "negative": "blurry", "strengths_a": "0, 0.7",
                  "strengths_b": "0, 0.5", "width": 64, "height": 64, **sample}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
              "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    # The core twins of four cells: (first, second, third) strengths, zero meaning no LoraLoader.
    twins = {"both, third under": ((0.7, 0.5, True), 3), "second and third": ((0, 0.5, True), 2),
             "base": ((0, 0, False), 4), "first alone": ((0.7, 0, False), 5)}
    node = 10
    for (strength_a, strength_b, third), _ in twins.values():
        source = ["1", 0], ["1", 1]
        chain = [(a, strength_a, strength_a), (b, strength_b, strength_b)] + [(c, 0.35, 0.2)] * third
        for name, model_strength, clip_strength in chain:
            if model_strength or clip_strength:
                prompt[str(node)] = {"class_type": "LoraLoader", "inputs": {
                    "model": source[0], "clip": source[1], "lora_name": name, "strength_model": model_strength,
                    "strength_clip": clip_strength}}
                source, node = ([str(node), 0], [str(node), 1]), node + 1
        prompt.update(core_sample(*source, node, "zkw_ring, zkw_blue, a cat", "blurry", ["5", 0], sample))
        node += 10
    prompt_id, messages = server.run(prompt)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    assert not _unloaded_keys(server, since)
    cells = output_images(server, prompt_id, "4")  # rows: second off, second 0.5 (third under), then the last
    assert len(cells) == 6
    outputs = sorted((int(key), key) for key, value in server.get(f"/history/{prompt_id}")[prompt_id]["outputs"].items()
                     if int(key) >= 10)
    for (what, (_, cell)), (_, key) in zip(twins.items(), outputs, strict=True):
        assert np.array_equal(cells[cell], output_images(server, prompt_id, key)[0]), what
    assert len({cell.tobytes() for cell in cells}) == 6  # every LoRA and strength changes the image
    done = [m["data"]["done"] for m in messages if m["type"] == "lora_lab.cell"]
    assert done == list(range(1, 7))  # progress and the k-of-n preview, per cell


def _peft_output_axis_dora(base, tmp_path: Path) -> tuple[Path, dict, dict]:
    """PEFT's own DoRA (use_dora: the magnitude on the output axis) on `base`, written with its
    magnitude as dora_scale (out, 1), as converters write it: the file, and each layer's change
    by PEFT's own merge, for the oracle to read."""
    import copy

    from lora_lab.trainer.export import named_layers
    from lora_lab.trainer.lora import ADAPTER
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=3.0, target_modules=list(model.family.targets("attention")), use_dora=True)
    inject_adapter_in_model(config, model.denoiser, adapter_name=ADAPTER)
    tensors, expected, shapes = {}, {}, {}
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in named_layers(model):
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            torch.nn.init.normal_(down, std=0.1)
            torch.nn.init.normal_(up, std=0.1)
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight
            magnitude.mul_(1 + 0.1 * torch.randn_like(magnitude))
            weight = layer.get_base_layer().weight
            before = weight.detach().clone()
            tensors.update({f"{name}.lora_down.weight": down.clone(), f"{name}.lora_up.weight": up.clone(),
                            f"{name}.alpha": torch.tensor(3.0), f"{name}.dora_scale": magnitude.reshape(-1, 1).clone()})
            layer.merge(adapter_names=[ADAPTER])
            expected[name], shapes[name] = weight.detach() - before, list(weight.shape)
            weight.copy_(before)
    path = tmp_path / "peft-use_dora.safetensors"
    save_file(tensors, str(path))
    return path, shapes, expected


def test_comfyui_weight_adapter_computes_the_change_each_adapter_type_trained(tmp_path):
    """The oracle: ComfyUI's own LoRA code (comfy.lora and its weight_adapter types, run with
    ComfyUI's Python) reads each adapter type's file, on each family's tiny model and in both LoKr
    scale cases, as the weight change PEFT trained (DoRA's on the layer's real base weight), loading
    every key. And why DoRA is LyCORIS's input axis: PEFT's own use_dora, whose magnitude is on the
    output axis, is not what ComfyUI computes from its file."""
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.export import lora_state_dict, named_layers, save_lora
    from lora_lab.trainer.families import FAMILY_NAMES
    from lora_lab.trainer.lora import ADAPTER
    from lora_lab.trainer.run import load_base_model
    from safetensors.torch import load_file

    from .test_adapters import CASES, randomised
    from .tiny_models import build

    jobs, expected = [], {}

    def add_job(path: Path, shapes: dict, deltas: dict, bases: dict | None = None) -> None:
        """Ask the oracle for a file's changes: on the base weights for a DoRA (its change depends on
        them), on zero weights otherwise (no cancellation against a large base in fp32)."""
        job = {"file": str(path), "shapes": shapes, "out": str(path.with_suffix(".comfy.safetensors"))}
        if bases is not None:
            job["base"] = str(path.with_suffix(".base.safetensors"))
            save_file({name: weight.detach().float().contiguous() for name, weight in bases.items()}, job["base"])
        expected[str(path)] = deltas
        jobs.append(job)

    for family in FAMILY_NAMES:
        folder = build(family, tmp_path / family)
        base = load_base_model(build_config({"family": family, "base_model": str(folder)}), torch.device("cpu"))
        for adapter, rank in CASES:
            model = randomised(base, adapter, rank, text_encoder=family != "flux")
            path = tmp_path / f"{family}-{adapter}-r{rank}.safetensors"
            save_lora(path, lora_state_dict(model, torch.float32), {})
            layers = named_layers(model)
            shapes = {name: list(layer.get_base_layer().weight.shape) for name, layer in layers}
            add_job(path, shapes, {name: layer.get_delta_weight(ADAPTER).detach().reshape(shapes[name])
                                   for name, layer in layers},
                    {name: layer.get_base_layer().weight for name, layer in layers} if adapter == "dora" else None)
        if family == "sd15":
            path, shapes, deltas = _peft_output_axis_dora(base, tmp_path)
            add_job(path, shapes, deltas, {name: layer.get_base_layer().weight
                                           for name, layer in named_layers(randomised(base, "lora", 4, False))})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(Path(__file__).with_name("comfy_adapter_oracle.py")),
                             COMFYUI_DIR, str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for job in jobs:
        figures = report[job["file"]]
        assert figures["unloaded"] == [] and figures["patched"] == len(job["shapes"]), (job["file"], figures)
        comfy_deltas = load_file(job["out"])
        worst = max(((comfy_deltas[name].double() - delta.double()).abs().max() / delta.abs().max()).item()
                    for name, delta in expected[job["file"]].items())
        print(f"{Path(job['file']).stem}: {len(job['shapes'])} layers, largest relative difference between "
              f"ComfyUI's change and PEFT's {worst:.1e}")
        if "use_dora" in job["file"]:  # ComfyUI divides by the base weight's norm on this axis
            assert worst > 1e-3, job["file"]
        else:
            assert worst < 1e-5, job["file"]


def _unloaded_keys(server: ComfyServer, since: int) -> list[str]:
    return [line for line in server.log()[since:].splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]


def sdxl_checkpoint(server: ComfyServer) -> str:
    """The random SDXL checkpoint in the server's checkpoints folder, built the first time."""
    path = server.base / "models" / "checkpoints" / "random_sdxl.safetensors"
    if not path.is_file():
        started = time.time()
        build_sdxl_checkpoint(path)
        print(f"SDXL checkpoint built in {time.time() - started:.0f} s")
    return path.name


def test_sdxl_trains_through_the_nodes_and_its_lora_loads(server):
    sdxl_checkpoint(server)
    sample = dict(seed=0, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    train = {"preset": "none", "steps": 2, "rank": 4, "alpha": 0.0, "learning_rate": 0.001, "resolution": 64,
             "batch_size": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "save_every": 1,
             "seed": 1, "name": "sdxl_test", "gradient_checkpointing": False, "mixed_precision": "auto",
             "min_snr_gamma": 0.0, "noise_offset": 0.0, "bucketing": True, "resume": "off",
             "resume_with_changes": False, "sample_every": -1, "prompts": "{trigger}", "validation_images": -1}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random_sdxl.safetensors"}},
        "2": {"class_type": "LoraLabLoadDataset", "inputs": {"folder": "concept", "lora_type": "object",
                                                             "trigger_word": "", "model": ["1", 0]}},
        "3": {"class_type": "LoraLabTrainLora", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "dataset": ["2", 0], **train}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "zkw_toy", "clip": ["3", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], **sample}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    since = len(server.log())
    started = time.time()
    prompt_id, messages = server.run(prompt)
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", server.log()[-3000:]
    assert [m["data"]["step"] for m in messages if m["type"] == "lora_lab.progress"] == [1, 2]
    assert "Segmind_Vega" in server.log()[since:] or "SDXL" in server.log()[since:]
    assert not _unloaded_keys(server, since)
    run_dir = server.base / "models" / "loras" / "lora_lab" / "sdxl_test"
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["sdxl_test-step000001.safetensors",
                                                                      "sdxl_test.safetensors"]
    print(f"SDXL train + sample workflow {time.time() - started:.1f} s")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_text_encoder_trains_through_the_nodes_and_loads_in_core_loraloaders_clip_half(server, family, tmp_path):
    """Train LoRA with train_text_encoder on: the file's text-encoder layers (SD 1.5: lora_te_; SDXL:
    lora_te1_ and lora_te2_) all load in core LoraLoader, whose CLIP half alone (strength_model 0)
    changes the image; Sample Checkpoint's cell equals core LoraLoader's. Against ComfyUI's own code
    (comfy_text_encoder_check.py): the copy of the CLIP the run trains in encodes exactly as the CLIP
    does, and the trained layers, started from in that copy, encode as core LoraLoader applies them."""
    from lora_lab.trainer.files import read_metadata
    from lora_lab.trainer.lora_files import read_header

    checkpoint = CHECKPOINT if family == "sd15" else sdxl_checkpoint(server)
    name = f"text_encoder_{family}"
    prompt = training_graph(checkpoint, train_settings(steps=2, save_every=2, learning_rate=0.01, seed=3, name=name,
                                                       train_text_encoder=True, text_encoder_lr=0.05),
                            trigger="zkw_toy")
    sample = dict(seed=5, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    prompt.update({
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "LoraLabSampleCheckpoint", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "training_run": ["3", 2], "prompts": "{trigger}",
            "negative": "", "strengths": "1", "width": 64, "height": 64, "checkpoints": "latest", **sample}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},
        "12": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 4],
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "13": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 4],
                                                      "strength_model": 0.0, "strength_clip": 1.0}},
        **core_sample(["12", 0], ["12", 1], 20, "zkw_toy", "", ["9", 0], sample),
        **core_sample(["13", 0], ["13", 1], 30, "zkw_toy", "", ["9", 0], sample),
        **core_sample(["1", 0], ["1", 1], 40, "zkw_toy", "", ["9", 0], sample),
    })
    since = len(server.log())
    prompt_id, _ = server.run(prompt)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    assert not _unloaded_keys(server, since)
    final = server.base / "models" / "loras" / "lora_lab" / name / f"{name}.safetensors"
    prefixes = {key.split("_text_model_")[0] for key in read_header(final) if key.startswith("lora_te")}
    assert prefixes == ({"lora_te"} if family == "sd15" else {"lora_te1", "lora_te2"})
    metadata = read_metadata(final)
    assert (metadata["ss_network_train_unet_only"], metadata["ss_text_encoder_lr"]) == ("False", "0.05")
    cell = output_images(server, prompt_id, "11")[0]
    core, clip_only, base = (output_images(server, prompt_id, node)[0] for node in ("24", "34", "44"))
    assert np.array_equal(cell, core)
    assert not np.array_equal(clip_only, base)  # the text-encoder half alone changes what is drawn

    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "lora_lab").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(Path(__file__).with_name(
        "comfy_text_encoder_check.py")), COMFYUI_DIR, str(packages), str(server.base / "models" / "checkpoints" /
                                                                         checkpoint), str(final), "a zkw_toy"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{family}: {report}")
    assert report["copy_vs_clip"] == 0.0 and report["unloaded"] == []
    assert report["text_encoder_layers"] == (48 if family == "sd15" else 176)  # CLIP-L (and CLIP-G): q, k, v, out
    assert report["core_changed"] > 1e-3 and report["ours_vs_core"] <= 1e-5 * report["core_changed"]


def test_flux_lora_from_our_exporter_loads_every_key(server):
    """A FLUX LoRA, LoHa and LoKr from our exporter, chained in core LoraLoaderModelOnly nodes on a
    model ComfyUI loads as FLUX: every key of each is loaded."""
    folder = server.base / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_1x1.safetensors",
                                                           "weight_dtype": "default"}}}
    layers = {}
    for node, adapter in enumerate(("lora", "loha", "lokr"), start=2):
        name = f"flux_test_{adapter}.safetensors"
        layers[adapter] = build_flux_model_and_lora(folder / "flux_1x1.safetensors",
                                                    server.base / "models" / "loras" / name, adapter)
        prompt[str(node)] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": [str(node - 1), 0], "lora_name": name, "strength_model": 1.0}}
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    since = len(server.log())
    prompt_id, _ = server.run(prompt)
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", server.log()[-3000:]
    assert "model_type FLUX" in server.log()[since:]
    assert not _unloaded_keys(server, since)
    print(f"FLUX adapters, layers per type {layers}: every key loaded")


EMPTY_SLOTS = {key: value for n in (1, 2, 3) for key, value in (
    (f"lora_{n}", "None"), (f"model_strength_{n}", 1.0), (f"clip_strength_{n}", 1.0), (f"enabled_{n}", True))}


@pytest.mark.parametrize("adapter", ["loha", "lokr", "dora"])
def test_each_adapter_type_trains_through_the_nodes_and_samples_as_core_lora_loader(server, adapter):
    """Train LoRA with `adapter` set: the file loads in core LoraLoader with no key left over, and
    Sample Checkpoint's cell and Apply LoRA Stack's image equal core LoraLoader's, pixel for pixel;
    strength 0 is the base."""
    name = f"adapter_{adapter}"
    prompt = small_training(CHECKPOINT, name, "zkw_toy", 3, steps=4, save_every=4, adapter=adapter)
    sample = dict(seed=5, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}

    def sampled(model: list, clip: list, first: int) -> dict:
        return core_sample(model, clip, first, "zkw_toy", "", ["9", 0], sample)

    prompt.update({
        "9": latent,
        "10": {"class_type": "LoraLabSampleCheckpoint", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "training_run": ["3", 2], "prompts": "{trigger}",
            "negative": "", "strengths": "0, 1", "width": 64, "height": 64, "checkpoints": "latest", **sample}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},
        "12": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 4],
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        **sampled(["12", 0], ["12", 1], 20),
        "13": {"class_type": "LoraLabApplyLoraStack", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "auto_strengths": False, "training_run": ["3", 2],
            "checkpoint": "latest", "run_strength": 1.0,
            **EMPTY_SLOTS}},
        **sampled(["13", 0], ["13", 1], 30),
        **sampled(["1", 0], ["1", 1], 40),
    })
    since = len(server.log())
    prompt_id, _ = server.run(prompt)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    assert not _unloaded_keys(server, since)
    final = server.base / "models" / "loras" / "lora_lab" / name / f"{name}.safetensors"
    from lora_lab.trainer.files import read_metadata

    arguments = json.loads(read_metadata(final)["ss_network_args"])  # LyCORIS's: a DoRA is its LoRA, decomposed
    assert arguments["algo"] == ("lora" if adapter == "dora" else adapter)
    assert arguments.get("dora_wd") == ("True" if adapter == "dora" else None)
    base, at_zero, at_one = output_images(server, prompt_id, "44")[0], *output_images(server, prompt_id, "11")
    core, stacked = output_images(server, prompt_id, "24")[0], output_images(server, prompt_id, "34")[0]
    assert np.array_equal(at_zero, base)  # strength 0 is the base
    assert np.array_equal(at_one, core) and np.array_equal(stacked, core)
    assert not np.array_equal(core, base)  # the adapter changes the image
    print(f"{adapter}: trained through the nodes; Sample Checkpoint, Apply LoRA Stack and core LoraLoader agree")


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr"])
def test_a_run_continues_from_a_lora_trained_by_comfyuis_own_training_nodes(server, algorithm):
    """ComfyUI's core TrainLoraNode + SaveLoRA write a file we did not write (ComfyUI's layout:
    original module names, convolution halves as matrices, full differences of norms and biases).
    Train LoRA's init_lora starts from it: the run's step 0 is that file in our layout, and core
    LoraLoader applies the two identically, pixel for pixel; the run trains on from there, and
    every file it writes loads with no key left over."""
    info = server.get("/object_info/TrainLoraNode")["TrainLoraNode"]  # its inputs differ between versions
    core = {**{widget.name: default_value(widget, info) for widget in widgets(info)},
            "steps": 2, "rank": 4, "learning_rate": 0.01, "seed": 3,
            "training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False,
            "existing_lora": "[None]", "batch_size": 1, "algorithm": algorithm}
    save_node = "SaveLoRA" if "SaveLoRA" in server.get("/object_info") else "SaveLoRANode"  # 0.33 / 0.3.64
    lora_output = info["output"].index("LORA_MODEL")
    core_prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "zkw_core toy", "clip": ["1", 1]}},
        "4": {"class_type": "TrainLoraNode", "inputs": {"model": ["1", 0], "latents": ["2", 0],
                                                         "positive": ["3", 0], **core}},
        "5": {"class_type": save_node, "inputs": {"lora": ["4", lora_output], "prefix": f"loras/core_{algorithm}"}},
    }
    prompt_id, _ = server.run(core_prompt)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    (saved,) = sorted((server.base / "output" / "loras").glob(f"core_{algorithm}_*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("diffusion_model.") for k in keys)
    differences = sum(k.endswith((".diff", ".diff_b")) for k in keys)
    start = f"core_{algorithm}.safetensors"
    shutil.copy(saved, server.base / "models" / "loras" / start)
    name = f"from_core_{algorithm}"
    prompt = small_training(CHECKPOINT, name, "zkw_toy", 4, steps=2, save_every=2, rank=0, init_lora=start)
    since = len(server.log())
    prompt_id, messages = server.run(prompt)
    if algorithm == "LoKr":  # core splits a convolution's kernel between the factors; PEFT cannot rebuild that
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "error"
        assert "split a convolution's kernel between LoKr's two factors" in server.log()[since:]
        assert not (server.base / "models" / "loras" / "lora_lab" / name).exists() or not list(
            (server.base / "models" / "loras" / "lora_lab" / name).glob("*.safetensors"))
        print("core TrainLoraNode LoKr file: refused before training, saying why")
        return
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    statuses = [m["data"].get("message", "") for m in messages if m["type"] == "lora_lab.status"]
    assert any("not an exact resume" in text for text in statuses), statuses
    from lora_lab.trainer.files import read_metadata

    step0 = f"lora_lab/{name}/{name}-step000000.safetensors"
    metadata = read_metadata(server.base / "models" / "loras" / step0)
    assert (metadata["lora_lab.init_lora"], metadata["lora_lab.init_lora_layout"]) == (start, "ComfyUI")
    assert json.loads(metadata["lora_lab.config"])["lora"]["adapter"] == algorithm.lower()
    sample = dict(seed=5, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal")
    compare = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
               "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
               **core_sample(["1", 0], ["1", 1], 50, "zkw_toy", "", ["9", 0], sample)}
    for first, lora in ((20, start), (30, step0), (40, f"lora_lab/{name}/{name}.safetensors")):
        compare[str(first - 1)] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0}}
        compare.update(core_sample([str(first - 1), 0], [str(first - 1), 1], first, "zkw_toy", "", ["9", 0], sample))
    prompt_id, _ = server.run(compare)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    assert not _unloaded_keys(server, since)
    from_core, ours_at_0, trained, base = (output_images(server, prompt_id, key)[0] for key in ("24", "34", "44", "54"))
    assert not np.array_equal(from_core, base)  # core's training changed the model ...
    assert np.array_equal(ours_at_0, from_core)  # ... and our step 0 is that change exactly
    assert not np.array_equal(trained, from_core)  # the run trained on from it
    print(f"core TrainLoraNode {algorithm} file ({len(keys)} keys, {differences} weight differences): our step 0 "
          "samples as it does in core LoraLoader, pixel for pixel; the run trained on from it")


def wait_for_job(server: ComfyServer, name: str, condition, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = next((j for j in server.get("/lora_lab/jobs")["jobs"] if j["name"] == name), None)
        if job and condition(job):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {name}: {job}\n{server.log()[-3000:]}")


def test_background_training_lets_prompts_sample_its_checkpoints_and_trains_the_same_lora(server):
    """Queue a background run; while it trains, three prompts sample its newest checkpoint (each
    finishes while the job goes on); its LoRA equals a foreground run's bit for bit."""
    settings = train_settings(steps=150, save_every=10, name="bg", background=True)
    queued = time.time()
    prompt_id, _ = server.run(training_graph(CHECKPOINT, settings))
    returned = time.time() - queued
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    job = wait_for_job(server, "bg", lambda j: j["checkpoints"])
    assert job["status"] in ("training", "paused") and job["step"] < 150
    started_at, started_step = time.time(), job["step"]
    time.sleep(3)
    alone = (wait_for_job(server, "bg", lambda j: True)["step"] - started_step) / (time.time() - started_at)
    sample = {"class_type": "LoraLabSampleCheckpoint", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": "{trigger}", "negative": "",
        "strengths": "1", "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "width": 64, "height": 64, "training_run": ["3", 2], "checkpoints": "latest"}}
    sampling = training_graph(CHECKPOINT, settings, {"4": sample, "5": {"class_type": "PreviewImage",
                                                               "inputs": {"images": ["4", 0]}}})
    before = wait_for_job(server, "bg", lambda j: True)["step"]
    window = time.time()
    seconds = []
    for seed in range(3):  # a new seed each time, so every prompt samples (nothing is cached)
        sampling["4"]["inputs"]["seed"] = seed
        queued = time.time()
        prompt_id, messages = server.run(sampling)
        seconds.append(time.time() - queued)
        status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
        assert status["status_str"] == "success", server.log()[-3000:]
        assert output_images(server, prompt_id, "5")
        assert any(m["type"] == "executed" and m["data"]["node"] == "4" for m in messages)
        assert wait_for_job(server, "bg", lambda j: True)["status"] in ("training", "paused")  # still going
    beside = (wait_for_job(server, "bg", lambda j: True)["step"] - before) / (time.time() - window)
    assert len([j for j in server.get("/lora_lab/jobs")["jobs"] if j["name"].startswith("bg")]) == 1
    final = wait_for_job(server, "bg", lambda j: j["status"] not in ("training", "paused"))
    assert final["status"] == "finished", final
    print(f"background: Train LoRA returned in {returned:.1f} s; queue to sampled image while it trains "
          f"{', '.join(f'{s:.1f}' for s in seconds)} s; job {alone:.1f} steps/s alone, {beside:.1f} steps/s "
          f"with prompts beside it; paused {final['paused_seconds']} s")
    prompt_id, _ = server.run(training_graph(CHECKPOINT, train_settings(steps=150, save_every=10, name="fg")))
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    from safetensors.torch import load_file

    folder = server.base / "models" / "loras" / "lora_lab"
    background, foreground = load_file(folder / "bg" / "bg.safetensors"), load_file(folder / "fg" / "fg.safetensors")
    assert background.keys() == foreground.keys()
    assert all((background[key] == foreground[key]).all() for key in background)


def test_a_background_run_of_the_text_encoder_takes_turns_and_trains_the_same_lora(server):
    """A background run that trains the text encoder shares the graph's CLIP with the prompts that
    take turns with it (each applies its newest checkpoint to that CLIP, text-encoder half included,
    and encodes); after each turn it takes ComfyUI's tensors anew, and its LoRA equals a foreground
    run's bit for bit."""
    settings = train_settings(steps=40, save_every=10, name="bg_text", background=True, train_text_encoder=True)
    prompt_id, _ = server.run(training_graph(CHECKPOINT, settings))
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    wait_for_job(server, "bg_text", lambda j: j["checkpoints"])
    sample = {"class_type": "LoraLabSampleCheckpoint", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": "{trigger}", "negative": "",
        "strengths": "1", "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "width": 64, "height": 64, "training_run": ["3", 2], "checkpoints": "latest"}}
    sampling = training_graph(CHECKPOINT, settings, {"4": sample, "5": {"class_type": "PreviewImage",
                                                               "inputs": {"images": ["4", 0]}}})
    for seed in range(2):
        sampling["4"]["inputs"]["seed"] = seed
        prompt_id, _ = server.run(sampling)
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    final = wait_for_job(server, "bg_text", lambda j: j["status"] not in ("training", "paused"))
    assert final["status"] == "finished" and final["paused_seconds"] > 0, final
    prompt_id, _ = server.run(training_graph(CHECKPOINT, {**settings, "name": "fg_text", "background": False}))
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    from safetensors.torch import load_file

    folder = server.base / "models" / "loras" / "lora_lab"
    background = load_file(folder / "bg_text" / "bg_text.safetensors")
    foreground = load_file(folder / "fg_text" / "fg_text.safetensors")
    assert background.keys() == foreground.keys() and any(key.startswith("lora_te_") for key in background)
    assert all((background[key] == foreground[key]).all() for key in background)


def test_a_background_job_stops_from_the_route_and_resumes(server):
    settings = train_settings(steps=100, save_every=50, name="bgstop", background=True)
    server.run(training_graph(CHECKPOINT, settings))
    wait_for_job(server, "bgstop", lambda j: j["step"] >= 3)
    reply = server.post("/lora_lab/jobs/stop", {"name": "bgstop"})["job"]
    assert (reply["name"], reply["status"]) == ("bgstop", "stopping") and reply["message"].startswith("Stopping")
    job = wait_for_job(server, "bgstop", lambda j: j["status"] == "stopped")
    step = job["checkpoints"][-1]["step"]
    assert 3 <= step < 100 and "resume to 'latest'" in job["message"]
    run_dir = server.base / "models" / "loras" / "lora_lab" / "bgstop"
    assert (run_dir / f"bgstop-step{step:06d}.resume").is_file()
    # Resumed in the background: one entry for the run in the job list, current, with every checkpoint.
    prompt_id, messages = server.run(training_graph(CHECKPOINT, train_settings(steps=100, save_every=50, name="bgstop",
                                                                   resume="latest", background=True)))
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-3000:]
    job = wait_for_job(server, "bgstop", lambda j: j["status"] == "finished")
    assert [j["name"] for j in server.get("/lora_lab/jobs")["jobs"]].count("bgstop") == 1
    assert [c["step"] for c in job["checkpoints"]] == [step, 50, 100] and "Finished" in job["message"]
    journal = server.get("/lora_lab/run?name=bgstop")["run"]
    assert [c["step"] for c in journal["checkpoints"]] == [step, 50, 100]


# --- saved workflows, messages and containment (issue: a graph you can queue again) -------------------

FROZEN = REPO / "tests" / "fixtures" / "workflows"
QUICK_STEPS = {"LoraLabTrainLora": {"steps": 4, "save_every": 2, "resolution": 64},
               "LoraLabSampleCheckpoint": {"steps": 2, "width": 64, "height": 64},
               "LoraLabCompareLoraStack": {"steps": 2, "width": 64, "height": 64},
               "KSampler": {"steps": 2}, "EmptyLatentImage": {"width": 64, "height": 64}}


def _shipped_names_exist(server: ComfyServer) -> None:
    """The files the examples name, made here: only step counts (and sizes) change in the prompts."""
    base = server.base
    checkpoint = base / "models" / "checkpoints" / CHECKPOINT
    shipped = base / "models" / "checkpoints" / "your_sd15_checkpoint.safetensors"
    if not shipped.exists():
        shipped.symlink_to(checkpoint)
    if not (base / "input" / "my_dataset").exists():
        shutil.copytree(embedded.CONCEPT_DATASET, base / "input" / "my_dataset")
    lora = base / "models" / "loras" / "lora_lab" / "server_test" / "server_test.safetensors"
    for name in ("first_lora.safetensors", "second_lora.safetensors"):
        if not (base / "models" / "loras" / name).exists():
            shutil.copyfile(lora, base / "models" / "loras" / name)
    for folder, name in (("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                         ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).touch()  # FLUX: named for validation (the FLUX tier runs them)


def _quick(prompt: dict) -> dict:
    for node in prompt.values():
        node["inputs"].update(QUICK_STEPS.get(node["class_type"], {}))
    return prompt


@pytest.mark.parametrize("path", sorted(FROZEN.glob("*/*.api.json")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_frozen_api_prompt_validates_and_runs(server, path):
    """API prompts written for every earlier release are accepted (no required_input_missing) and run
    as they did then; the FLUX ones validate here (the FLUX tier runs FLUX)."""
    _shipped_names_exist(server)
    prompt = _quick(json.loads(path.read_text()))
    is_flux = any(node["class_type"] == "UNETLoader" for node in prompt.values())
    if is_flux:
        try:
            answer = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id, "front": True})
        except urllib.error.HTTPError as error:
            pytest.fail(f"{path.name} no longer validates: {error.read().decode()[:2000]}")
        server.post("/queue", {"delete": [answer["prompt_id"]]})
        server.post("/interrupt", {})
        assert not answer.get("node_errors")
        return
    since = len(server.log())
    prompt_id, _ = server.run(prompt)
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "success", server.log()[since:][-3000:]
    assert not _unloaded_keys(server, since)


def test_messages_and_replies_say_only_what_a_user_needs(server):
    since = len(server.log())
    # A hostile name is refused before anything happens (no "Loading the model" on the panel).
    prompt_id, messages = server.run(training_graph(CHECKPOINT, train_settings(steps=2, name="../../evil")))
    assert any(m["type"] == "execution_error" and "not a plain file name" in m["data"]["exception_message"]
               for m in messages)
    assert not [m for m in messages if m["type"] == "lora_lab.status"]
    # A training's log: no diffusers chatter, no absolute paths.
    prompt_id, _ = server.run(training_graph(CHECKPOINT, train_settings(steps=2, save_every=1, name="quiet")))
    log = server.log()[since:]
    assert "should be kept in float32" not in log, log[-2000:]
    # No folder of the user's is named (tracebacks ComfyUI prints name where the code is installed).
    for folder in ("models", "input"):
        assert str(server.base / folder) not in log, log[-2000:]
    # Train LoRA's lora_name feeds nodes that take any type, as well as LoraLoader.
    graph = training_graph(CHECKPOINT, train_settings(steps=2, save_every=1, name="quiet"),
                           {"4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}}})
    prompt_id, _ = server.run(graph)
    assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success", server.log()[-2000:]
    # A missing LoRA in Apply LoRA Stack's second slot is blamed on that slot alone.
    slots = {f"{key}_{n}": value for n in (1, 2, 3)
             for key, value in (("model_strength", 0.7), ("clip_strength", 0.7), ("enabled", True))}
    stack = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
             "2": {"class_type": "LoraLabApplyLoraStack", "inputs": {
                 "model": ["1", 0], "clip": ["1", 1], "auto_strengths": False, **slots,
                 "lora_1": "None", "lora_2": "not_here.safetensors", "lora_3": "None"}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.post("/prompt", {"prompt": stack, "client_id": server.client_id})
    errors = json.loads(refused.value.read())["node_errors"]["2"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["lora_2"], errors
    assert "not_here.safetensors" in errors[0]["details"] and "lora_2 - lora_2" not in errors[0]["details"]


def test_routes_refuse_hostile_requests_briefly(server):
    nested = "[" * 100_000 + "]" * 100_000
    request = urllib.request.Request(server.url + "/lora_lab/jobs/stop", data=f'{{"name": {nested}}}'.encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 400
    for route in ("/lora_lab/run?name=" + "x" * 100_000, "/lora_lab/run?name=nothing_here"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            server.get(route)
        body = answer.value.read().decode()
        assert answer.value.code in (400, 404) and len(body) < 300 and str(server.base) not in body, body
    # A run folder that is a link to elsewhere is not served.
    elsewhere = server.base / "elsewhere_run"
    shutil.copytree(server.base / "models" / "loras" / "lora_lab" / "server_test", elsewhere / "linked")
    for old in (elsewhere / "linked").glob("server_test*"):
        old.rename(old.with_name(old.name.replace("server_test", "linked")))
    (server.base / "models" / "loras" / "lora_lab" / "linked").symlink_to(elsewhere / "linked")
    with pytest.raises(urllib.error.HTTPError) as answer:
        server.get("/lora_lab/run?name=linked")
    assert answer.value.code == 404
    (server.base / "models" / "loras" / "lora_lab" / "linked").unlink()
    # Resume files name no folder of this machine.
    for state in (server.base / "models" / "loras" / "lora_lab").glob("*/*.resume"):
        assert str(server.base).encode() not in state.read_bytes(), state


def test_a_finished_training_is_handed_on_after_other_work_and_a_restart(server):
    """Train, run another workflow, restart the server, queue the first graph again: no new folder,
    no step trained, the outputs identical."""
    sample = dict(seed=5, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    graph = training_graph(CHECKPOINT, train_settings(steps=6, save_every=3, name="again"), {
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}},
        "5": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 4],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "zkw_toy", "clip": ["5", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], **sample}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    })
    folder = server.base / "models" / "loras" / "lora_lab"

    def queue() -> tuple[list, list]:
        prompt_id, messages = server.run(graph)
        status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
        assert status["status_str"] == "success", server.log()[-3000:]
        return [output_images(server, prompt_id, node)[0] for node in ("4", "11")], messages

    first, messages = queue()
    assert [m["data"]["step"] for m in messages if m["type"] == "lora_lab.progress"] == list(range(1, 7))
    runs = sorted(p.name for p in folder.iterdir())
    other = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "something else", "clip": ["1", 1]}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    server.run(other)  # another workflow: ComfyUI's cache lets go of Train LoRA's outputs
    for moment in ("after another workflow", "after a restart"):
        if moment == "after a restart":
            server.stop()
            server.start()
        again, messages = queue()
        assert not [m for m in messages if m["type"] == "lora_lab.progress"], f"trained again {moment}"
        assert sorted(p.name for p in folder.iterdir()) == runs, f"a new run folder {moment}"
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), f"other outputs {moment}"
        finished = [m["data"] for m in messages if m["type"] == "lora_lab.status" and m["data"]["status"] == "finished"]
        assert finished and "handed on without training again" in finished[-1]["message"]
