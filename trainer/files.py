"""Files a run writes and reads: every write goes through a temporary file and a rename, so a
crash leaves the old file or the new one, never half of one; and LoRA metadata is read from the
checked header alone.

New files get the permissions the process's umask gives (0644 under the usual 022), like every
other file in ComfyUI's model folders: a ComfyUI running as another user (a container, a shared
server) must be able to read the LoRAs it lists.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .lora_files import read_header


def current_umask() -> int:
    """The process's umask (Linux reports it; elsewhere it is read by setting it back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call `write(temporary_path)`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # reserves a unique name
    try:
        write(str(temporary))
        # Writers such as safetensors create their file 0600 whatever the umask: give it the usual mode.
        os.chmod(temporary, 0o666 & ~current_umask())
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def atomic_save_image(path: Path, image: Image.Image) -> None:
    """A PNG (or the format the suffix names), written atomically."""
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda temporary: image.save(temporary, format=image_format))


def metadata_json(value: Any) -> str:
    """A metadata value (safetensors metadata holds strings only)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def read_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's metadata, after its header has been checked."""
    return dict(read_header(path)["__metadata__"])
