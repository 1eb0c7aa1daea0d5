"""Test helper: just enough of ComfyUI's modules (V3 `io`/`ui`, folder_paths, comfy.*) for the
nodes to import and run without ComfyUI, recording what they ask of it. The real-server test
(test_comfyui_server.py) is the authority on the real API."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Port:
    id: str | None
    io_type: str
    options: dict = field(default_factory=dict)

    def get_io_type(self) -> Any:
        return self.io_type

    @property
    def extra_dict(self) -> dict:  # ComfyUI merges it into the input's options
        return self.options


def _port_type(io_type: str) -> type:
    class PortType:
        class Input(Port):  # a class, as ComfyUI's, so the nodes may subclass it
            def __init__(self, id: str, **options: Any) -> None:
                super().__init__(id, io_type, options)

        @staticmethod
        def Output(id: str | None = None, **options: Any) -> Port:  # noqa: N802
            return Port(id, io_type, options)

    PortType.io_type = io_type
    return PortType


class Schema:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class NodeOutput:
    def __init__(self, *values: Any, ui: Any = None) -> None:
        self.values, self.ui = values, ui


class ComfyNode:
    hidden = types.SimpleNamespace(unique_id="7", prompt=None, extra_pnginfo=None)


def make_io() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in {"Model": "MODEL", "Clip": "CLIP", "Vae": "VAE", "Image": "IMAGE", "String": "STRING",
                          "Int": "INT", "Float": "FLOAT", "Boolean": "BOOLEAN", "Combo": "COMBO",
                          "Mask": "MASK"}.items():
        setattr(io, name, _port_type(io_type))
    io.Custom = _port_type
    io.Schema, io.NodeOutput, io.ComfyNode = Schema, NodeOutput, ComfyNode
    io.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID", prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO")
    return io


class Recorder:
    """What the nodes did through ComfyUI: LoRAs applied, images sampled, progress."""

    def __init__(self, loras: Path) -> None:
        self.loras = loras
        self.applied: list[tuple] = []
        self.interrupted = False


def install(loras: Path, input_dir: Path) -> Recorder:
    recorder = Recorder(loras)
    io = make_io()
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewImage = lambda images, cls=None: types.SimpleNamespace(as_dict=lambda: {"images": images})
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, object
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda name: [str(loras)]
    folder_paths.get_filename_list = lambda name: sorted(p.relative_to(loras).as_posix()
                                                         for p in loras.rglob("*.safetensors"))
    folder_paths.get_full_path = lambda name, file: str(loras / file) if (loras / file).is_file() else None
    folder_paths.get_input_directory = lambda: str(input_dir)
    folder_paths.models_dir = str(input_dir.parent / "models")
    folder_paths.base_path = str(input_dir.parent)
    comfy = types.ModuleType("comfy")
    modules = {"comfy": comfy, "folder_paths": folder_paths, "comfy_api": types.ModuleType("comfy_api"),
               "comfy_api.latest": latest}
    for name in ("model_management", "model_sampling", "sample", "samplers", "sd", "supported_models", "utils"):
        module = types.ModuleType(f"comfy.{name}")
        setattr(comfy, name, module)
        modules[f"comfy.{name}"] = module
    comfy.samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "dpmpp_2m"], SCHEDULERS=["normal", "karras"])
    comfy.model_management.processing_interrupted = lambda: recorder.interrupted
    comfy.model_management.get_torch_device = lambda: __import__("torch").device("cpu")
    comfy.model_management.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})

    def throw_if_interrupted() -> None:
        if recorder.interrupted:
            raise comfy.model_management.InterruptProcessingException()

    comfy.model_management.throw_exception_if_processing_interrupted = throw_if_interrupted
    comfy.utils.ProgressBar = lambda total, node_id=None: types.SimpleNamespace(update_absolute=lambda *_: None)
    for name, parent in (("SD15", object), ("SDXL", object), ("Flux", object)):  # model classes, by name
        setattr(comfy.supported_models, name, type(name, (parent,), {}))
    comfy.supported_models.Segmind_Vega = type("Segmind_Vega", (comfy.supported_models.SDXL,), {})
    comfy.utils.load_torch_file = lambda path, safe_load=True: {"file": str(path)}

    def load_lora_for_models(model, clip, lora, model_strength, clip_strength):
        recorder.applied.append((lora["file"], model_strength, clip_strength))
        return ({"base": model, "lora": lora["file"], "strength": model_strength},
                {"base": clip, "lora": lora["file"], "strength": clip_strength})

    comfy.sd.load_lora_for_models = load_lora_for_models
    sys.modules.update(modules)
    for name in [n for n in sys.modules if n.startswith("lora_lab.nodes")]:
        del sys.modules[name]  # re-import the nodes against these stubs
    return recorder
