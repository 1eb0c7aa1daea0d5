"""Node widgets made from the trainer's own settings, so names, defaults, ranges, choices and
tooltips are the trainer's (one source of truth)."""

from __future__ import annotations

from dataclasses import MISSING
from typing import Any

from ..trainer.config import field_specs
from .comfy_bridge import io


def setting_widget(name: str, optional: bool = False, **overrides: Any) -> Any:
    """An input widget for the trainer setting `name` (overrides replace default/min/max/tooltip);
    `optional` for a setting added after the first release (an older prompt may lack it)."""
    _, spec = field_specs()[name]
    meta = spec.metadata
    default = overrides.pop("default", spec.default if spec.default is not MISSING else spec.default_factory())
    tooltip = overrides.pop("tooltip", meta["help"])
    if meta["choices"]:
        options = [*overrides.pop("extra_choices", ()), *meta["choices"]]
        return io.Combo.Input(name, options=options, default=default, tooltip=tooltip, optional=optional)
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, tooltip=tooltip, optional=optional)
    if isinstance(default, int):
        return io.Int.Input(name, default=default, min=int(overrides.pop("min", meta["low"] or 0)),
                            max=int(overrides.pop("max", meta["high"] or 2**31 - 1)), tooltip=tooltip,
                            control_after_generate=overrides.pop("control_after_generate", None), optional=optional)
    if isinstance(default, float):
        return io.Float.Input(name, default=default, min=overrides.pop("min", meta["low"] or 0.0),
                              max=overrides.pop("max", meta["high"] or 1e9), step=overrides.pop("step", 0.01),
                              round=overrides.pop("round", False), tooltip=tooltip, optional=optional)
    if isinstance(default, tuple):  # a list of values: one a line
        multiline = overrides.pop("multiline", True)
        return io.String.Input(name, default=("\n" if multiline else ",").join(map(str, default)), multiline=multiline,
                               tooltip=tooltip, optional=optional)
    return io.String.Input(name, default=default, tooltip=tooltip, optional=optional)
