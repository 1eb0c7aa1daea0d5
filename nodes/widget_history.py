"""Saved workflows are public API: what a node does with an API prompt or workflow written for an
older version of its inputs. The history itself is data (web/widget_history.json), shared with the
frontend, which migrates old UI workflows' widget values by it as they load.

- An input added since the first release is optional; when a prompt lacks it, the node uses the
  value recorded in the history's `added` map, which keeps the old behaviour (a Train LoRA prompt
  written before validation existed still trains on every image).
- An input that was removed (`removed`) is still accepted: ComfyUI drops inputs a node no longer
  declares, and the node logs a note saying it was ignored.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

HISTORY_FILE = Path(__file__).resolve().parents[1] / "web" / "widget_history.json"
log = logging.getLogger(__name__)


@functools.cache
def history() -> dict[str, Any]:
    return json.loads(HISTORY_FILE.read_text(encoding="utf-8"))["nodes"]


def with_added_defaults(node_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with every later-added input a prompt left out set to its old-behaviour value."""
    return {**history()[node_id]["added"], **inputs}


def note_removed_inputs(node_id: str, prompt: dict | None, unique_id: str | None) -> list[str]:
    """Log (once per run of the node) the removed inputs this node's entry in the queued prompt
    still carries; returns their names."""
    entry = (prompt or {}).get(str(unique_id), {})
    given = entry.get("inputs", {}) if isinstance(entry, dict) else {}
    ignored = [name for name in history()[node_id]["removed"] if name in given]
    if ignored:
        log.info("LoRA Lab: %s ignored input(s) %s from an older workflow; they no longer exist (the connected "
                 "MODEL decides the family now).", node_id, ", ".join(ignored))
    return ignored
