"""A LoRA file carries its training graph (trainer/workflow.py): ComfyUI's frontend opens the
`workflow` (or else the `prompt`) in a dropped file's header. A run from a graph stores that
graph; a run from the command line stores a prompt built from its config, which validates against
the nodes. No local path leaves the machine; the header stays well inside the 4 MB the frontend
reads. (The real browser opens a dropped file: tests/test_browser.py.)"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from lora_lab.trainer.files import read_metadata
from lora_lab.trainer.run import train_lora
from lora_lab.trainer.workflow import MAX_GRAPH_BYTES, graph_metadata, without_local_paths

from .test_saved_workflows import object_info

FRONTEND_READS = 4 * 1024 * 1024  # the frontend parses the header from the file's first 4 MB


def frontend_header(path: Path) -> dict[str, str]:
    """The header's metadata as ComfyUI's frontend reads it (getLatentMetadata: the first 4 MB)."""
    head = path.read_bytes()[:FRONTEND_READS]
    size = struct.unpack("<Q", head[:8])[0]
    return json.loads(head[8:8 + size])["__metadata__"]


def test_local_paths_are_cut_to_their_names():
    graph = {"nodes": [{"widgets_values": ["/home/ann/datasets/cats", "C:\\Users\\ann\\sd15.safetensors",
                                           "~/loras", "\\\\nas\\share\\set", "my_dataset", "a cat\n/not/a/path",
                                           "lora_lab/run/run.safetensors", 7, None]}],
             "prompt": {"3": {"inputs": {"folder": "/srv/data/dogs", "model": ["1", 0]}}}}
    cut = without_local_paths(graph)
    assert cut["nodes"][0]["widgets_values"] == ["cats", "sd15.safetensors", "loras", "set", "my_dataset",
                                                 "a cat\n/not/a/path", "lora_lab/run/run.safetensors", 7, None]
    assert cut["prompt"]["3"]["inputs"] == {"folder": "dogs", "model": ["1", 0]}


def test_a_command_line_run_stores_a_prompt_of_the_nodes_that_train_it(concept_run, nodes):
    """What the demo wrote: a prompt whose every LoRA Lab node has its required inputs, each combo a
    value it offers, Train LoRA's values those of the run, and no path of this machine."""
    path = concept_run.final_path
    header = frontend_header(path)
    assert header == read_metadata(path)
    assert "workflow" not in header  # the frontend lays a prompt out itself
    prompt = json.loads(header["prompt"])
    info = object_info(nodes)
    classes = [node["class_type"] for node in prompt.values()]
    assert classes == ["CheckpointLoaderSimple", "LoraLabLoadDataset", "LoraLabTrainLora", "LoraLabSampleCheckpoint"]
    for node in prompt.values():
        if node["class_type"] not in info:
            continue
        for name, (kind, _options) in info[node["class_type"]]["input"]["required"].items():
            assert name in node["inputs"], (node["class_type"], name)
            if isinstance(kind, list):
                assert node["inputs"][name] in kind, (node["class_type"], name, node["inputs"][name])
    train = prompt["5"]["inputs"]
    config = concept_run.config
    assert (train["name"], train["seed"], train["prompts"]) == (config.output.name, config.train.seed,
                                                                "\n".join(config.sample.prompts))
    assert train["dataset"] == ["4", 0] and prompt["6"]["inputs"]["training_run"] == ["5", 2]
    assert prompt["4"]["inputs"]["folder"] == (Path(config.data.dataset).name if config.data.dataset else "my_dataset")
    assert str(Path.home()) not in header["prompt"] and str(path.parent) not in header["prompt"]
    header_bytes = struct.unpack("<Q", path.read_bytes()[:8])[0]
    print(f"header {header_bytes / 1e3:.0f} kB, of which the prompt {len(header['prompt']) / 1e3:.1f} kB")
    assert header_bytes < FRONTEND_READS / 4


def test_a_run_from_a_graph_stores_that_graph_without_local_paths(make_config, fresh_model, tmp_path):
    workflow = {"nodes": [{"id": 2, "type": "LoraLabLoadDataset", "widgets_values": [str(tmp_path / "my set"),
                                                                                    "style", "zkw", ""]}],
                "links": [], "extra": {"ds": {"scale": 0.8}}, "version": 0.4}
    prompt = {"2": {"class_type": "LoraLabLoadDataset", "inputs": {"folder": str(tmp_path / "my set")}}}
    result = train_lora(make_config(steps=2, save_every=1, sample_every=-1, validation_images=-1),
                        model=fresh_model, graph=(workflow, prompt))
    for checkpoint in result.checkpoints:  # every file opens the graph, not only the last
        header = frontend_header(checkpoint.path)
        assert json.loads(header["workflow"])["nodes"][0]["widgets_values"][0] == "my set"
        assert json.loads(header["prompt"])["2"]["inputs"]["folder"] == "my set"
        assert str(tmp_path) not in header["workflow"] + header["prompt"]


def test_a_graph_too_large_for_the_header_is_left_out_with_a_warning(caplog):
    huge = {"nodes": [{"widgets_values": ["x" * MAX_GRAPH_BYTES]}]}
    with caplog.at_level(logging.WARNING):
        assert graph_metadata(huge, None) == {}
    assert "too large" in caplog.text
    assert set(graph_metadata({"nodes": []}, {"1": {}})) == {"workflow", "prompt"}


def test_a_flux_run_from_the_command_line_opens_comfyuis_flux_loaders():
    """FLUX as ComfyUI users hold it: the transformer file (in fp8 where the base trained in fp8),
    CLIP-L + T5-XXL through DualCLIPLoader, the VAE file; sampled with the simple scheduler."""
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.workflow import cli_prompt

    config = build_config({"base_model": "/models/flux1-dev.safetensors", "fp8_base": True, "dataset": "/d/cats"})
    prompt = cli_prompt(config, get_family("flux"))
    assert prompt["1"] == {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                                  "weight_dtype": "fp8_e4m3fn"}}
    assert prompt["2"]["class_type"] == "DualCLIPLoader" and prompt["2"]["inputs"]["type"] == "flux"
    assert prompt["3"]["inputs"] == {"vae_name": "ae.safetensors"}
    assert prompt["5"]["inputs"]["clip"] == ["2", 0] and prompt["5"]["inputs"]["vae"] == ["3", 0]
    assert prompt["6"]["inputs"]["scheduler"] == "simple" and prompt["6"]["inputs"]["width"] == 1024
    assert prompt["4"]["inputs"]["folder"] == "cats"
