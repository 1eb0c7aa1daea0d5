"""How ComfyUI's frontend lays out a node's widgets, which fixes the positions of `widgets_values`
in UI-format workflow files, and how it turns such a workflow into the API prompt it queues.

One implementation, used by the example builder (scripts/build_example_workflows.py) and by the
tests that queue the examples; the browser tests (tests/test_browser.py) prove it against the real
frontend. It follows ComfyUI_frontend, as shipped in comfyui-frontend-package 1.27.10 and 1.58.1:

- A widget is made for every input of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO, or an
  option list), in the order of the node definition's `input_order` (required, then optional),
  whether or not a link feeds it; inputs marked forceInput get none.
- An INT input gets a second widget, "control after generate", right after its own when its
  options say `control_after_generate: true`, or say nothing and it is named `seed` or
  `noise_seed` (useIntWidget: `inputSpec.control_after_generate ?? ["seed", "noise_seed"]
  .includes(inputSpec.name)`); a COMBO only when they say true (useComboWidget). Its value is
  "fixed", "increment", "decrement" or "randomize".
- `widgets_values` holds every widget's value in that order (LGraphNode.serialize).
- graphToPrompt sends each widget by name, except the control widgets (their option serialize
  is false), and a linked input as [source node id, output slot]; Note nodes are not sent.

And what LoRA Lab's own frontend (web/lora_lab.js) adds: a LoRA Lab node saved with an older widget
layout (web/widget_history.json) has its values laid out anew as it loads (`migrate_widgets_values`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
FRONTEND_ONLY_NODES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")
WIDGET_HISTORY = Path(__file__).resolve().parents[1] / "web" / "widget_history.json"


@dataclass(frozen=True)
class Widget:
    name: str
    kind: str
    options: dict[str, Any]
    has_control: bool  # followed by a "control after generate" widget


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node definition's inputs, in the frontend's order."""
    groups = info["input"]
    order = info.get("input_order") or {group: list(groups.get(group, {})) for group in ("required", "optional")}
    specs = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = groups[group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            specs.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return specs


def widgets(info: dict) -> list[Widget]:
    """The widgets the frontend makes for a node definition, in order (control widgets implied)."""
    made = []
    for name, kind, options in input_specs(info):
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        if options.get("image_upload") or options.get("remote"):
            raise ValueError(f"{name}: upload and remote widgets are not modelled here")
        control = options.get("control_after_generate")
        if kind == "INT" and control is None:
            control = name in SEED_NAMES
        made.append(Widget(name, kind, options, bool(control) and kind in ("INT", "COMBO")))
    return made


def default_value(widget: Widget, info: dict) -> Any:
    if "default" in widget.options:
        return widget.options["default"]
    if widget.kind == "COMBO":
        choices = widget.options.get("options") or _combo_choices(info, widget.name)
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[widget.kind]


def _combo_choices(info: dict, name: str) -> list:
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec and isinstance(spec[0], list):
            return spec[0]
    return []


def widgets_values(info: dict, values: dict[str, Any], control: str = "fixed") -> list[Any]:
    """A node's `widgets_values`: `values` by widget name, defaults for the rest."""
    unknown = set(values) - {w.name for w in widgets(info)}
    if unknown:
        raise KeyError(f"not widgets of this node: {sorted(unknown)}")
    laid_out = []
    for widget in widgets(info):
        laid_out.append(values.get(widget.name, default_value(widget, info)))
        if widget.has_control:
            laid_out.append(control)
    return laid_out


def named_values(info: dict, values: list[Any]) -> dict[str, Any]:
    """The inverse of widgets_values: each widget's value by name (control widgets left out)."""
    named, position = {}, iter(values)
    for widget in widgets(info):
        named[widget.name] = next(position)
        if widget.has_control:
            choice = next(position)
            if choice not in CONTROL_VALUES:
                raise ValueError(f"{widget.name}: {choice!r} where the control widget's value belongs; "
                                 "the widget values are shifted")
    if next(position, None) is not None:
        raise ValueError("more widget values than widgets: the widget values are shifted")
    return named


def widget_history() -> dict[str, Any]:
    return json.loads(WIDGET_HISTORY.read_text(encoding="utf-8"))["nodes"]


def saved_layout(entry: dict, values: list, saved: Any) -> int | None:
    """Which of a node's layouts (1-based) its saved values follow: the one its properties name,
    else the newest whose length matches and whose control slots, and only those, hold control
    values ("fixed", "randomize", ...)."""
    if isinstance(saved, int) and 1 <= saved <= len(entry["layouts"]):
        return saved
    for index in range(len(entry["layouts"]), 0, -1):
        names = entry["layouts"][index - 1]["widgets"]
        if len(names) == len(values) and all(name.endswith("#control") == (value in CONTROL_VALUES)
                                              for name, value in zip(names, values, strict=True)):
            return index
    return None


def migrate_widgets_values(node_type: str, values: list, properties: dict | None = None) -> list:
    """A LoRA Lab node's saved values laid out in its current layout, as web/lora_lab.js does on load."""
    entry = widget_history().get(node_type)
    if entry is None or not isinstance(values, list):
        return values
    layout = saved_layout(entry, values, (properties or {}).get("lora_lab_layout"))
    if layout is None:
        raise ValueError(f"{node_type}: {len(values)} widget values match none of its layouts")
    named = dict(zip(entry["layouts"][layout - 1]["widgets"], values, strict=True))
    return [named[name] if name in named else "fixed" if name.endswith("#control") else entry["added"][name]
            for name in entry["layouts"][-1]["widgets"]]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow as the API prompt the frontend would queue."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        info = object_info[node["type"]]
        saved = migrate_widgets_values(node["type"], node.get("widgets_values", []), node.get("properties"))
        inputs: dict[str, Any] = dict(named_values(info, saved))
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                source = links[slot["link"]]
                inputs[slot["name"]] = [str(source[1]), source[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
