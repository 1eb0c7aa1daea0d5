"""The adapter types a run can train, each one module with one `ADAPTER` (adapters/base.py's
interface), found by name as the model families are. The model family names the layers; the
adapter owns what each layer holds: its PEFT config, trainable tensors, file keys and their
checks, and how a file's tensors load back. A new adapter type is one module and one line here."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Adapter

# name -> module; kept free of imports so the config can list the choices cheaply.
ADAPTER_MODULES = {"lora": "lora", "loha": "loha", "lokr": "lokr", "dora": "dora"}
ADAPTER_NAMES = tuple(ADAPTER_MODULES)


def get_adapter(name: str) -> Adapter:
    try:
        module = ADAPTER_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; choose one of {', '.join(ADAPTER_NAMES)}") from None
    return import_module(f".{module}", __name__).ADAPTER


def all_adapters() -> list[Adapter]:
    return [get_adapter(name) for name in ADAPTER_NAMES]


def adapter_of_layer(layer: Any) -> Adapter:
    """The adapter type of an adapted PEFT layer: the most specific one (a DoRA layer is a LoRA
    layer too)."""
    found = [adapter for adapter in all_adapters() if isinstance(layer, adapter.layer_class)]
    if not found:
        raise ValueError(f"{type(layer).__name__} is not a layer of any LoRA Lab adapter type")
    return max(found, key=lambda adapter: len(adapter.layer_class.__mro__))
