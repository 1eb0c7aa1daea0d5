"""Train LoRA's FLUX path against ComfyUI's own FLUX model code (skipped unless COMFYUI_DIR is set):
the diffusers transformer it trains is a view of ComfyUI's weights (fused q/k/v sliced, not
copied) and computes what ComfyUI computes; weights ComfyUI holds in fp8 stay fp8.

ComfyUI's FLUX text encoder needs a full-size T5-XXL, which this CPU cannot run, so FLUX training
is not run through the server; this check and the family contract suite cover it instead."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .comfy_server import REPO, comfy_python

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]


def test_shared_flux_transformer_matches_comfyui(tmp_path):
    (tmp_path / "lora_lab").symlink_to(REPO, target_is_directory=True)
    result = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(Path(__file__).with_name("comfy_flux_check.py")),
                             COMFYUI_DIR, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["shares_storage"] and figures["max_difference"] < 1e-5
    assert figures["fp8_layer"] == "Float8Linear" and figures["fp8_max_difference"] < 0.1 * figures["scale"]
