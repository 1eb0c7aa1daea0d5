"""Saved and shared workflows keep working (public API): every frozen release's example workflows and
API prompts (tests/fixtures/workflows/) validate against today's nodes, keep their values, and mean
what they meant then. The widget history the frontend migrates by (web/widget_history.json) ends in
exactly the layout today's schemas make. The real server runs them (test_comfyui_server.py) and the
browser loads them (test_browser.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .comfy_server import REPO

sys.path.insert(0, str(REPO / "scripts"))
from frontend_rules import (  # noqa: E402
    CONTROL_VALUES,
    FRONTEND_ONLY_NODES,
    migrate_widgets_values,
    named_values,
    saved_layout,
    widget_history,
    widgets,
)

FIXTURES = REPO / "tests" / "fixtures" / "workflows"
VERSIONS = sorted(path.name for path in FIXTURES.iterdir() if path.is_dir())
UI_FILES = sorted(p for p in FIXTURES.glob("*/*.json") if not p.name.endswith(".api.json"))
API_FILES = sorted(FIXTURES.glob("*/*.api.json"))


def object_info(nodes) -> dict:
    """Today's node definitions in the shape of ComfyUI's /object_info, from the schemas."""
    info = {}
    for node in nodes.NODES:
        schema = node.define_schema()
        groups, order = {"required": {}, "optional": {}}, {"required": [], "optional": []}
        for port in schema.inputs:
            group = "optional" if port.options.get("optional") else "required"
            kind = port.get_io_type()
            groups[group][port.id] = [kind if isinstance(kind, list) else str(kind), dict(port.options)]
            order[group].append(port.id)
        info[schema.node_id] = {"input": groups, "input_order": order}
    return info


def test_there_is_a_frozen_release_per_widget_layout():
    assert len(VERSIONS) >= 5 and len(UI_FILES) == len(API_FILES) >= 20


def test_the_widget_history_ends_in_todays_layouts(nodes):
    history, info = widget_history(), object_info(nodes)
    assert set(history) == set(info)
    for node_id, entry in history.items():
        made = [name for w in widgets(info[node_id]) for name in ([w.name, f"{w.name}#control"] if w.has_control
                                                                   else [w.name])]
        assert entry["layouts"][-1]["widgets"] == made, node_id
        # Every input added since the first release is optional, with a value for prompts that lack it.
        first = set(entry["layouts"][0]["widgets"])
        added = {name for layout in entry["layouts"] for name in layout["widgets"]} - first
        assert set(entry["added"]) == {name for name in added if not name.endswith("#control")}, node_id
        required = set(info[node_id]["input_order"]["required"])
        assert not required & set(entry["added"]), f"{node_id}: inputs added later must be optional"
        assert set(entry["removed"]) == {name for name in first - set(made) if not name.endswith("#control")}, node_id


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_saved_workflow_loads_with_its_values(nodes, path):
    """As the browser loads it: each LoRA Lab node's values land in the widgets of the same name, the
    inputs added later take the value that keeps the old behaviour, removed ones are dropped."""
    history, info = widget_history(), object_info(nodes)
    api = json.loads(path.with_name(f"{path.stem}.api.json").read_text())
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] not in history:
            continue
        entry = history[node["type"]]
        migrated = named_values(info[node["type"]], migrate_widgets_values(node["type"], node["widgets_values"],
                                                                           node.get("properties")))
        queued = api[str(node["id"])]["inputs"]  # what that release's frontend sent for this node
        layout = saved_layout(entry, node["widgets_values"], (node.get("properties") or {}).get("lora_lab_layout"))
        saved = entry["layouts"][layout - 1]["widgets"]
        for name, value in migrated.items():
            if name in saved:  # a value the file holds
                assert value == queued[name], f"{node['type']}.{name}"
            else:  # an input the file's layout did not have: the old behaviour (its own frontend filled in
                # the new widget's default when an example was stale, as 2026-12-02b's were)
                assert value == entry["added"][name], f"{node['type']}.{name}: {value!r}"
        assert not set(queued) - set(migrated) - set(entry["removed"]) - {
            slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_saved_api_prompt_validates_against_todays_nodes(nodes, path):
    """What ComfyUI checks before it runs a prompt: every required input is there, and what a node no
    longer declares is one it has dropped (ComfyUI ignores it; the node logs a note)."""
    history, info = widget_history(), object_info(nodes)
    for node_id, node in json.loads(path.read_text()).items():
        if node["class_type"] not in info:
            continue
        declared = info[node["class_type"]]["input_order"]
        given = set(node["inputs"])
        missing = set(declared["required"]) - given
        assert not missing, f"{node_id} {node['class_type']}: required_input_missing {sorted(missing)}"
        unknown = given - set(declared["required"]) - set(declared["optional"])
        assert unknown <= set(history[node["class_type"]]["removed"]), unknown


@pytest.mark.parametrize("path", [p for p in API_FILES if "Train" in p.name or "train" in p.name],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_an_old_training_prompt_trains_what_it_trained_then(nodes, path, tmp_path):
    """An older prompt's Train LoRA settings build today's config, and what it did not say keeps the
    behaviour of its day: no validation hold-out and no samples before those existed."""
    from lora_lab.nodes.train_lora import NODE_ID, node_config
    from lora_lab.nodes.widget_history import with_added_defaults

    prompt = json.loads(path.read_text())
    train = next(node for node in prompt.values() if node["class_type"] == NODE_ID)
    widgets_given = {k: v for k, v in train["inputs"].items() if not isinstance(v, list)}
    values = with_added_defaults(NODE_ID, widgets_given)
    config = node_config({k: v for k, v in values.items() if k != "background"}, tmp_path, "style")
    for name in ("validation_images", "sample_every"):
        expected = widgets_given.get(name, -1)
        assert getattr(config.data if name == "validation_images" else config.sample, name) == expected
    assert config.output.name == widgets_given["name"] and config.lora.rank == widgets_given["rank"]


def test_layouts_are_recognised_by_their_length_and_control_slots():
    history = widget_history()
    for node_id, entry in history.items():
        for index, layout in enumerate(entry["layouts"], start=1):
            values = ["fixed" if name.endswith("#control") else 7 for name in layout["widgets"]]
            assert saved_layout(entry, values, None) == index, f"{node_id} layout {index}"
            assert saved_layout(entry, values, index) == index
    assert CONTROL_VALUES and FRONTEND_ONLY_NODES
    with pytest.raises(ValueError, match="match none of its layouts"):
        migrate_widgets_values("LoraLabCaption", ["only", "two"])


def test_removed_inputs_are_ignored_with_a_note(nodes, caplog):
    from lora_lab.nodes.widget_history import note_removed_inputs

    prompt = json.loads(Path(FIXTURES / "2026-11-28" / "train_and_test_lora.api.json").read_text())
    dataset_node = next(k for k, v in prompt.items() if v["class_type"] == "LoraLabLoadDataset")
    with caplog.at_level("INFO"):
        assert note_removed_inputs("LoraLabLoadDataset", prompt, dataset_node) == ["family"]
    assert "ignored input(s) family" in caplog.text
