"""Which folders a workflow may make the server read datasets from or write captions to.

A workflow is a file strangers share, so its folder widgets must not choose freely where the
server reads or writes; environment variables are set by whoever runs the server, never by a
workflow (both are lists separated like PATH):

- writes (Caption's .txt files): ComfyUI's input folder and the folders in LORA_LAB_WRITABLE_FOLDERS;
- dataset reads: any folder on a server that listens on this machine only (ComfyUI's default); on
  a server started with --listen beyond the loopback address, only the input folder and the
  folders in LORA_LAB_DATASET_FOLDERS (and the writable ones).

Symbolic links that lead out of those folders are refused (the dataset's own files: trainer/data.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..trainer.errors import LoraLabError
from . import comfy_bridge as comfy

WRITABLE_FOLDERS_VARIABLE = "LORA_LAB_WRITABLE_FOLDERS"
DATASET_FOLDERS_VARIABLE = "LORA_LAB_DATASET_FOLDERS"


def _listed(variable: str) -> list[Path]:
    return [Path(part).expanduser() for part in os.environ.get(variable, "").split(os.pathsep) if part.strip()]


def writable_roots() -> list[Path]:
    return [path.resolve() for path in (comfy.input_directory(), *_listed(WRITABLE_FOLDERS_VARIABLE))]


def dataset_roots() -> list[Path]:
    return [*writable_roots(), *(path.resolve() for path in _listed(DATASET_FOLDERS_VARIABLE))]


def resolve_dataset_folder(folder: str) -> Path:
    """A folder inside ComfyUI's input directory (a relative path may not climb out of it), or an
    absolute folder: as given on a local server (the user names their dataset; it is only read),
    inside the allowed folders on a server others can reach."""
    path = Path(folder.strip()).expanduser()
    if not path.is_absolute():
        inside = (comfy.input_directory() / path).resolve()
        if not inside.is_relative_to(comfy.input_directory().resolve()):
            raise LoraLabError(f"Dataset folder {folder[:200]!r} points outside ComfyUI's input folder; give a folder "
                               "inside it (e.g. my_dataset) or an absolute path.")
        return inside
    if comfy.server_is_local() or any(path.resolve().is_relative_to(root) for root in dataset_roots()):
        return path
    raise LoraLabError(f"Dataset folder {folder[:200]!r} is outside ComfyUI's input folder, and this server accepts "
                       "workflows from the network (--listen), so it reads datasets only from the input folder and "
                       f"the folders its owner lists in {DATASET_FOLDERS_VARIABLE}. Move the dataset into "
                       "ComfyUI's input folder, or (as the server's owner) add its folder to "
                       f"{DATASET_FOLDERS_VARIABLE} before starting ComfyUI.")
