"""Checking a LoRA file before anything reads its tensors: a file from a stranger may have a
malformed header, tensors whose shapes disagree with their bytes, layers whose halves do not fit
together, or absurd metadata. Each problem becomes a message that names the file and the fault.

Only the header (JSON, at most a few MiB) is parsed here; tensors are never touched, and nothing
but safetensors is ever read, so no file can run code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoraLabError

if TYPE_CHECKING:
    from .families.base import ModelFamily

MAX_HEADER_BYTES = 32 * 2**20  # real LoRA headers are well under 1 MiB, metadata included
MAX_METADATA_BYTES = 16 * 2**20
MAX_TENSORS = 200_000
MAX_TENSOR_ELEMENTS = 2**31  # about 4-8 GB in one tensor: far beyond any LoRA layer
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _refuse(path: Path, problem: str) -> LoraLabError:
    return LoraLabError(f"{path.name} is not a usable LoRA file: {problem}. Download or export it again; "
                        "if it came with a shared workflow, ask its author for the file.")


def read_header(path: Path, suffixes: tuple[str, ...] = (".safetensors",)) -> dict[str, Any]:
    """The safetensors header of `path`, checked entry by entry against the file's size."""
    if path.suffix.lower() not in suffixes:
        raise _refuse(path, f"only .safetensors files are read (not {path.suffix or 'files without extension'}), "
                      "since other formats can run code when loaded")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _refuse(path, f"the file is {size} bytes, too short to be safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                raise _refuse(path, f"its header claims {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as error:
        raise LoraLabError(f"Could not read {path}: {error.strerror or error}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse(path, "its header is not valid JSON (damaged or truncated file)") from None
    if not isinstance(header, dict):
        raise _refuse(path, "its header is not a JSON object")
    data_size = size - 8 - length
    metadata = header.pop("__metadata__", {}) or {}
    _check_metadata(path, metadata)
    if len(header) > MAX_TENSORS:
        raise _refuse(path, f"it lists {len(header)} tensors")
    spans = []
    for name, entry in header.items():
        spans.append(_check_entry(path, name, entry, data_size))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise _refuse(path, f"tensors {first} and {second} overlap")
    header["__metadata__"] = metadata
    return header


def _check_metadata(path: Path, metadata: Any) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _refuse(path, "its metadata is not a map of text to text")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise _refuse(path, "its metadata is implausibly large")


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(path, f"tensor {name!r} has a malformed entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _refuse(path, f"tensor {name!r} has unknown type {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _refuse(path, f"tensor {name!r} has a malformed shape {shape!r}")
    elements = math.prod(shape)
    if elements > MAX_TENSOR_ELEMENTS:
        raise _refuse(path, f"tensor {name!r} claims {elements:,} elements")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _refuse(path, f"tensor {name!r} has malformed data offsets")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise _refuse(path, f"tensor {name!r} lies outside the file (truncated download?)")
    if end - start != elements * DTYPE_BYTES[dtype]:
        raise _refuse(path, f"tensor {name!r} has shape {shape} but {end - start} bytes")
    return start, end, name


def layer_keys(header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, list[int]]], list[str]]:
    """A header's tensors grouped by layer: (layer -> adapter type, layer -> {key suffix: shape},
    the keys of no adapter type we know, `.alpha` ones left aside)."""
    from .adapters import all_adapters  # the adapter types' modules import PEFT: only when a file is read

    suffixes = sorted(((suffix, adapter) for adapter in all_adapters() for suffix in adapter.file_suffixes),
                      key=lambda pair: -len(pair[0]))  # "hada_w1_a" before "w1_a"-like shorter endings
    layers: dict[str, dict[str, list[int]]] = {}
    kinds: dict[str, set] = {}
    others = []
    for name, entry in header.items():
        if name == "__metadata__" or name.endswith(".alpha"):
            continue
        for suffix, adapter in suffixes:
            if name.endswith(f".{suffix}"):
                layer = name[:-len(suffix) - 1]
                layers.setdefault(layer, {})[suffix] = entry["shape"]
                kinds.setdefault(layer, set()).add(adapter)
                break
        else:
            others.append(name)
    for layer, found in kinds.items():
        for adapter in [adapter for adapter in found if adapter.extends]:
            if adapter.extends in {other.name for other in found}:  # DoRA's magnitude beside LoRA's halves: DoRA
                kinds[layer] = found = {adapter, *(other for other in found if other.name != adapter.extends)}
            elif len(found) > 1:  # beside another type (a LyCORIS LoHa with a magnitude): left to the loader
                found.discard(adapter)
                others.extend(f"{layer}.{suffix}" for suffix in adapter.file_suffixes if suffix in layers[layer])
                for suffix in adapter.file_suffixes:
                    layers[layer].pop(suffix, None)
    return kinds, layers, others


def check_lora(path: Path) -> dict[str, Any]:
    """The header of an adapter file whose layers fit together: each layer holds the keys of one
    adapter type (trainer/adapters/: LoRA's two halves of one rank, LoHa's four
    factors, LoKr's two), and a scalar alpha if any. Keys of no type we know are left to the
    loader that reads them (ComfyUI also reads OFT, GLoRA, ...)."""
    header = read_header(path)
    for name, entry in header.items():
        if name.endswith(".alpha") and math.prod(entry["shape"]) != 1:
            raise _refuse(path, f"{name} should be one number but has shape {entry['shape']}")
    if len(header) == 1:
        raise _refuse(path, "it holds no tensors")
    kinds, layers, _ = layer_keys(header)
    for layer, shapes in layers.items():
        if len(kinds[layer]) > 1:
            titles = " and ".join(sorted(adapter.title for adapter in kinds[layer]))
            raise _refuse(path, f"layer {layer} mixes {titles} keys")
        (adapter,) = kinds[layer]
        problem = adapter.check_layer(shapes)
        if problem:
            raise _refuse(path, f"{adapter.title} layer {layer} {problem}")
    return header


def other_family(layers: list[str], family: ModelFamily) -> ModelFamily | None:
    """The family a LoRA's layers belong to when none is `family`'s: each family's files name their
    layers by its `layer_patterns`. None when a layer is `family`'s, or when no family we know
    names them all (a layout we do not write: left to the loader, which lists what it drops)."""
    from .families import all_families

    def names(candidate: ModelFamily, layer: str) -> bool:
        return any(re.fullmatch(pattern, layer) for pattern in candidate.layer_patterns)

    if not layers or any(names(family, layer) for layer in layers):
        return None
    return next((candidate for candidate in all_families()
                 if candidate.name != family.name and all(names(candidate, layer) for layer in layers)), None)
