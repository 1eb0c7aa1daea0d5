"""The GPU paths as far as a CPU can prove them: the prepared GPU check runs in miniature
(scripts/gpu_check.py --device cpu --tiny), an out-of-memory step lets go of its memory, and Train
LoRA drops the training state before ComfyUI is asked to free memory for sampling."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.lora import lora_parameters
from lora_lab.trainer.run import train_lora

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_in_miniature_on_the_cpu(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--budget", "1e9",  # every case, however busy the machine (the budget is for GPU loans)
                           "--json", str(report_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = {(row["family"], row["case"]): row for row in report["rows"]}
    for family in ("sd15", "sdxl", "flux"):
        for case in ("base", "checkpointing", "fp8_base"):
            row = rows[family, case]
            assert row["status"] == "ok" and row["losses_finite"] and row["s_per_step"] > 0, row
            assert row["estimate"] > 0 and row["minutes_per_1000"] == pytest.approx(row["s_per_step"] * 1000 / 60)
        assert rows[family, "adamw8bit"]["status"].startswith("skipped: needs bitsandbytes")
    assert report["overfit"]["falling"] and report["overfit"]["finite"]
    resume = report["resume"]
    assert resume["stopped_at"] == resume["steps"] // 2 and resume["resume_difference"] == 0  # bit for bit on CPU
    assert "family    px  case          dtype" in done.stdout and "resume: stopped at 3 of 6" in done.stdout


def test_an_out_of_memory_step_lets_go_of_its_memory(make_config, fresh_model, monkeypatch):
    """The advice must not carry the failed step's activations with it: ComfyUI keeps the error."""
    predict, held = fresh_model.family.predict, []

    def failing_predict(model, noisy, *args):
        if noisy.device.type != "meta" and torch.is_grad_enabled():
            activation = torch.ones(1000)
            held.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(model, noisy, *args)

    monkeypatch.setattr(fresh_model.family, "predict", failing_predict)
    with pytest.raises(LoraLabError, match="Out of memory at step 1") as caught:
        train_lora(make_config(steps=2, name="oom", sample_every=-1, validation_images=-1), model=fresh_model)
    gc.collect()
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    assert held and held[0]() is None


def test_train_lora_drops_the_training_state_before_comfyui_frees_memory(nodes, stubs, monkeypatch, base_model):
    import copy

    from lora_lab.nodes import comfy_bridge, graph_model
    from lora_lab.nodes import train_lora as node
    from lora_lab.nodes.values import DatasetValue
    from lora_lab.trainer import embedded
    from lora_lab.trainer.data import scan_folder
    from lora_lab.trainer.families.base import ModelIdentity

    models = [copy.deepcopy(base_model)]  # handed over once: the test keeps no reference of its own
    refs: list[weakref.ref] = [weakref.ref(models[0].denoiser)]
    seen: list[bool] = []

    def loaded(*args):
        return models.pop()

    def release() -> None:  # what ComfyUI's soft_empty_cache would find
        gc.collect()
        seen.append(all(ref() is None for ref in refs))

    original_train = node.train_lora

    def train(*args, **kwargs):
        result = original_train(*args, **kwargs)
        refs.extend(weakref.ref(p) for p in lora_parameters(result.model))
        return result

    monkeypatch.setattr(node, "train_lora", train)
    monkeypatch.setattr(graph_model, "model_identity", lambda m, name: ModelIdentity(name, "weights"))
    monkeypatch.setattr(graph_model, "loaded_model", loaded)
    monkeypatch.setattr(graph_model, "family_of", lambda m: base_model.family)
    monkeypatch.setattr(comfy_bridge, "training_mode", contextlib.nullcontext)
    monkeypatch.setattr(comfy_bridge, "release_training_memory", release)
    monkeypatch.setattr(node.TrainLora, "hidden", types.SimpleNamespace(unique_id="7", prompt={}, extra_pnginfo=None))
    schema = node.TrainLora.define_schema()
    widgets = {i.id: i.options["default"] for i in schema.inputs if "default" in i.options}
    widgets.update(name="handoff", steps=2, rank=4, sample_every=-1, validation_images=-1)
    dataset = DatasetValue(scan_folder(str(embedded.CONCEPT_DATASET)), str(embedded.CONCEPT_DATASET), "f")
    node.TrainLora.execute("MODEL", "CLIP", "VAE", dataset, **widgets)
    assert seen == [True], "the trained model, its LoRA or its optimizer outlived the run"
