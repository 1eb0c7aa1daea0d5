"""Queueing a training graph again (after ComfyUI's cache let go of Train LoRA's outputs: another
workflow ran, or the server restarted) hands a finished run on without training, offers a stopped
one for resume = latest instead of restarting it, and trains a new run when a setting, the dataset
or the model changed, saying what changed. The real server: test_comfyui_server.py."""

from __future__ import annotations

import contextlib
import copy
import json
import types

import pytest
import torch
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.history import journal_path

QUICK = {"preset": "none", "steps": 4, "save_every": 2, "rank": 4, "learning_rate": 1e-3, "sample_every": -1,
         "seed": 3, "name": "again", "validation_images": -1}


@pytest.fixture
def node(nodes, stubs, monkeypatch, base_model, concept_dataset):
    """Train LoRA over the stubbed ComfyUI, training the embedded model for real; `trained` counts
    the runs that trained, `model_key` is the base model's digest (change it to change the model)."""
    from lora_lab.nodes import comfy_bridge, graph_model, train_lora
    from lora_lab.nodes.values import DatasetValue
    from lora_lab.trainer.data import scan_folder
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import ModelIdentity

    state = types.SimpleNamespace(trained=[], model_key="weights-1", sent=[])
    real_train = train_lora.train_lora

    def counted_train(config, events, **kwargs):
        state.trained.append(config.output.name)
        return real_train(config, events, **kwargs)

    monkeypatch.setattr(train_lora, "train_lora", counted_train)
    monkeypatch.setattr(graph_model, "family_of", lambda model: get_family("sd15"))
    monkeypatch.setattr(graph_model, "model_identity", lambda model, name: ModelIdentity(name, state.model_key))
    monkeypatch.setattr(graph_model, "loaded_model", lambda model, clip, vae, identity, *_: copy.deepcopy(base_model))
    monkeypatch.setattr(comfy_bridge, "training_mode", contextlib.nullcontext)
    monkeypatch.setattr(comfy_bridge, "release_training_memory", lambda: None)
    state.cancel_at = None

    def send(event, data):
        state.sent.append((event, data))
        if event == "lora_lab.progress" and data["step"] == state.cancel_at:
            stubs.interrupted = True  # the user presses Cancel

    monkeypatch.setattr(comfy_bridge, "send", send)
    monkeypatch.setattr(comfy_bridge, "raise_interrupted", lambda: None)
    monkeypatch.setattr(train_lora.TrainLora, "hidden",
                        types.SimpleNamespace(unique_id="4", prompt={}, extra_pnginfo=None))
    schema = train_lora.TrainLora.define_schema()
    state.widgets = {i.id: i.options["default"] for i in schema.inputs if "default" in i.options}
    state.dataset = DatasetValue(scan_folder(concept_dataset), "folder", "fingerprint-1", lora_type="object")
    state.folder = stubs.loras / "lora_lab"

    def queue(**settings):
        values = {**state.widgets, **QUICK, **settings}
        return train_lora.TrainLora.execute("MODEL", "CLIP", "VAE", state.dataset, **values).values

    state.queue = queue
    return state


def _same_outputs(first, second) -> None:
    model_a, clip_a, run_a, curve_a, name_a = first
    model_b, clip_b, run_b, curve_b, name_b = second
    assert (model_a, clip_a, run_a, name_a) == (model_b, clip_b, run_b, name_b)
    assert torch.equal(curve_a, curve_b)


def test_a_finished_run_is_handed_on_not_trained_again(node):
    first = node.queue()
    assert node.trained == ["again"]
    again = node.queue()  # the cache let go (another workflow, or a restart): Train LoRA executes again
    assert node.trained == ["again"], "a finished run was trained again"
    _same_outputs(first, again)
    assert sorted(p.name for p in node.folder.iterdir()) == ["again"]  # no again_2
    finished = [data for event, data in node.sent if event == "lora_lab.status" and data["status"] == "finished"]
    assert finished[-1]["reused"] and "handed on without training again" in finished[-1]["message"]
    # Sample prompts change no weight: still the same run.
    _same_outputs(first, node.queue(prompts="{trigger}, another prompt", sample_every=2))
    assert node.trained == ["again"]


@pytest.mark.parametrize("change, said", [
    ({"rank": 8}, "rank: 4 -> 8"),
    ("dataset", "the dataset changed"),
    ("model", "the base model changed"),
])
def test_a_changed_setting_image_or_model_trains_a_new_run_and_says_what_changed(node, change, said):
    node.queue()
    if change == "dataset":
        node.dataset = type(node.dataset)(node.dataset.dataset, "folder", "fingerprint-2", lora_type="object")
        change = {}
    elif change == "model":
        node.model_key = "weights-2"
        change = {}
    node.queue(**change)
    assert node.trained == ["again", "again_2"]
    started = [data["message"] for event, data in node.sent
               if event == "lora_lab.status" and data["status"] == "training" and data["run"] == "again_2"]
    assert said in started[0] and "since run again" in started[0]


def test_a_stopped_run_is_offered_for_resume_never_restarted(node, stubs):
    node.cancel_at = 2
    node.queue(steps=6)  # Cancel at step 2: a resumable checkpoint
    stubs.interrupted, node.cancel_at = False, None
    with pytest.raises(LoraLabError, match=r"stopped at step 2 of 6.*Set resume to 'latest'"):
        node.queue(steps=6)
    assert node.trained == ["again"] and sorted(p.name for p in node.folder.iterdir()) == ["again"]
    # The offer is on the panel, as a stopped run's message.
    offered = [data for event, data in node.sent if event == "lora_lab.status" and data["status"] == "stopped"]
    assert "resume to 'latest'" in offered[-1]["message"]
    model, clip, run, curve, name = node.queue(steps=6, resume="latest")
    assert node.trained == ["again", "again"] and [step for step, _ in run.checkpoints] == [2, 4, 6]
    # Once finished, queueing it again (with resume still on latest, or off) hands it on.
    _same_outputs((model, clip, run, curve, name), node.queue(steps=6, resume="latest"))
    _same_outputs((model, clip, run, curve, name), node.queue(steps=6))
    assert node.trained == ["again", "again"]


def test_resume_latest_finds_this_trainings_run_whatever_its_folder_is_called(node):
    node.queue()  # "again", finished
    node.queue(rank=8, steps=6)  # "again_2", finished, other settings
    journal = journal_path(node.folder / "again_2", "again_2")
    state = json.loads(journal.read_text())
    state["owner"]["server"] = "an earlier server"  # a server stopped while it trained
    journal.write_text(json.dumps({**state, "status": "training", "checkpoints": state["checkpoints"][:1]}))
    for path in (node.folder / "again_2").glob("again_2.*"):
        path.unlink()  # the final checkpoint was never written
    node.queue(rank=8, steps=6, resume="latest")
    assert node.trained == ["again", "again_2", "again_2"]
    assert json.loads(journal.read_text())["status"] == "finished"


def test_missing_inputs_of_an_older_prompt_keep_the_old_behaviour(node, monkeypatch):
    from lora_lab.nodes import train_lora

    seen = []

    def config_only(config, events, **kwargs):
        seen.append(config)
        raise LoraLabError("stop here")

    monkeypatch.setattr(train_lora, "train_lora", config_only)
    first_release = {k: v for k, v in {**node.widgets, **QUICK}.items()
                     if k not in ("resume", "resume_with_changes", "sample_every", "prompts", "validation_images",
                                  "background")}
    with pytest.raises(LoraLabError, match="stop here"):
        train_lora.TrainLora.execute("MODEL", "CLIP", "VAE", node.dataset, **first_release)
    config = seen[0]
    # Before validation and samples existed, every image trained and nothing was sampled.
    assert config.data.validation_images == -1 and config.sample.sample_every == -1
    assert config.output.resume == "" and config.sample.prompts == ("{trigger}",)
