"""Shared fixtures: the embedded tiny model and one LoRA trained on the concept dataset, made once
per test session because training is the slow part."""

from __future__ import annotations

import copy
import importlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from lora_lab.trainer import embedded, precision
from lora_lab.trainer.cli import DEMO_SETTINGS
from lora_lab.trainer.config import build_config
from lora_lab.trainer.run import TrainingResult, load_base_model, train_lora

# `auto` stays fp32 on every CPU the suite runs on (tests/test_precision.py covers bf16 on the CPU),
# so its figures do not depend on whether the runner's processor has bf16 units.
os.environ.setdefault(precision.AUTO_CPU_BF16, "off")

# The settings of the concept test: the CLI demo's.
CONCEPT_SETTINGS = {**DEMO_SETTINGS, "name": "concept"}


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


@pytest.fixture
def cpu_bf16(monkeypatch):
    """This CPU treated as one with bf16 units: torch emulates bf16 where it has none, with the same
    numbers, so the bf16 path is tested on any runner (only its speed differs)."""
    precision.cpu_has_bf16.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


@pytest.fixture
def make_config(tmp_path: Path):
    """A config whose outputs go to this test's temporary folder."""
    return lambda **settings: build_config({"output_dir": str(tmp_path / "out"), **settings})


@pytest.fixture(scope="session")
def base_model():
    """The tiny base model, loaded once; tests that add a LoRA take a deep copy."""
    return load_base_model(build_config({}), torch.device("cpu"))


@pytest.fixture
def fresh_model(base_model):
    return copy.deepcopy(base_model)


@pytest.fixture(scope="session")
def concept_run(tmp_path_factory, base_model) -> TrainingResult:
    """A LoRA trained on the embedded concept dataset (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("concept")
    config = build_config({**CONCEPT_SETTINGS, "output_dir": str(out)})
    return train_lora(config, model=copy.deepcopy(base_model))


@pytest.fixture
def stubs(tmp_path):
    """Just enough of ComfyUI for the nodes to import and run (see comfy_stubs.py)."""
    from . import comfy_stubs

    saved = dict(sys.modules)
    loras, inputs = tmp_path / "loras", tmp_path / "input"
    loras.mkdir()
    inputs.mkdir()
    recorder = comfy_stubs.install(loras, inputs)
    yield recorder
    for name in list(sys.modules):
        if name not in saved:
            del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def nodes(stubs):
    return importlib.import_module("lora_lab.nodes.extension")


@pytest.fixture
def concept_dataset() -> Path:
    return embedded.CONCEPT_DATASET
