"""Start a run from an existing adapter file (`init_lora`) instead of from zero: a LoRA, LoHa or
LoKr saved by kohya sd-scripts, diffusers (`save_lora_weights`), LyCORIS, ComfyUI's own training
nodes or LoRA Lab. The file's type, rank, alpha and layers become the run's, and its tensors the
adapter's starting weights. The optimizer, schedule and data order start anew, so this is not an
exact resume (`resume` is).

Each tool names a model layer its own way; a file may use any of these layouts:
- ours: kohya's `lora_unet_…` / `lora_te…` (SD 1.5, SDXL), diffusers' `transformer.…` (FLUX);
- diffusers': `unet.…`, `text_encoder.…`, `text_encoder_2.…`, `transformer.…`;
- ComfyUI's: `diffusion_model.<original module path>`, readable with a model that knows its
  original names (one from a ComfyUI graph: LoadedModel.original_names).
A LoRA's halves are lora_down/lora_up or lora_A/lora_B; ComfyUI writes a convolution's halves
flattened to matrices (export.load_tensors reshapes them).

ComfyUI's training nodes also write full differences of norm weights and biases (`.diff`,
`.diff_b`). They are not trained here: each is added to a copy of its base tensor (never to the
tensor a ComfyUI model shares) and written unchanged into every checkpoint, so the file means what
it meant. The run's first checkpoint, step 0, is the starting file itself in our layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensor_bytes

from .adapters import get_adapter
from .config import TrainingConfig
from .errors import LoraLabError
from .families.base import LoadedModel
from .lora_files import check_lora, layer_keys

log = logging.getLogger(__name__)

NOT_EXACT = ("it continues the file's weights with a new optimizer state, learning-rate schedule and data order: "
             "not an exact resume")
DIFFERENCES = {"diff": "weight", "diff_b": "bias"}  # ComfyUI's full differences -> the parameter they change
TEXT_ENCODER_LAYERS = ("lora_te", "text_encoder")  # how kohya's and diffusers' files name text-encoder layers


@dataclass(frozen=True)
class StartingAdapter:
    """What a starting file holds, in this model's terms."""

    name: str  # the file's name (recorded in the run's files)
    sha256: str
    layout: str  # "kohya", "diffusers" or "ComfyUI"
    adapter: str
    rank: int | None  # None where the file does not say (a LoKr of full factors only)
    alpha: float  # the most common layer alpha (each layer keeps its own)
    options: dict[str, Any]  # the type's own settings (lokr_factor)
    hints: dict[str, Any]  # what the type's PEFT config needs beyond them to rebuild the layers
    modules: dict[str, list[str]]  # export prefix -> adapted module paths
    tensors: dict[str, torch.Tensor] = field(repr=False)  # as lora_state_dict names them, alphas included
    differences: dict[str, tuple[str, torch.Tensor]] = field(repr=False)  # file key -> (parameter path, tensor)

    @property
    def trains_text_encoder(self) -> bool:
        return len(self.modules) > 1

    def describe(self) -> str:
        layers = sum(len(paths) for paths in self.modules.values())
        extra = f" and {len(self.differences)} weight differences" if self.differences else ""
        return (f"{self.name} ({self.layout} layout, {get_adapter(self.adapter).title} rank {self.rank or '?'}, "
                f"{layers} layers{extra})")


def _layer_aliases(model: LoadedModel) -> dict[str, tuple[str, str, str]]:
    """Every name a file may give a layer of this model -> (export prefix, module path, layout)."""
    family, aliases = model.family, {}
    ours = "kohya" if family.key_style == "kohya" else "diffusers"
    for index, (prefix, module) in enumerate(model.lora_modules()):
        diffusers = family.diffusers_prefixes[index] if index < len(family.diffusers_prefixes) else None
        for path, _ in module.named_modules():
            if not path:
                continue
            if diffusers:
                for spelling in {path, family.export_path(prefix, path), path.removeprefix("text_model.")}:
                    aliases[f"{diffusers}.{spelling}"] = (prefix, path, "diffusers")
            with contextlib.suppress(LoraLabError):  # a layer no loader maps (a norm) has no name of ours
                aliases[family.layer_name(prefix, path)] = (prefix, path, ours)
    for key, original in model.original_names.items():
        aliases[original.rsplit(".", 1)[0]] = (family.denoiser_prefix, key.rsplit(".", 1)[0], "ComfyUI")
    return aliases


def _made_for(metadata: dict[str, str]) -> str:
    """What a file's metadata says it was trained on, for messages."""
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name"):
        if metadata.get(key):
            return f" (its metadata says {key} = {metadata[key]})"
    return ""


def _diffusers_alphas(metadata: dict[str, str], path: Path) -> dict[str, float]:
    """diffusers' per-component alpha (`lora_adapter_metadata`), e.g. {"unet": 8.0}."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        raise LoraLabError(f"init_lora {path.name}: its lora_adapter_metadata is damaged.") from None
    alphas = {}
    for key, value in config.items():
        component, _, name = key.rpartition(".")
        if name in ("alpha_pattern", "rank_pattern") and value:
            raise LoraLabError(f"init_lora {path.name} gives layers their own {name[:-8]}s ({component}), which "
                               "LoRA Lab cannot start from; use a file with one rank and alpha.")
        if name == "lora_alpha" and isinstance(value, int | float):
            alphas[component] = float(value)
    return alphas


def read_starting_adapter(path: Path, model: LoadedModel) -> StartingAdapter:
    """The file at `path` in this model's terms, or a clear refusal: a file of another family, of a
    type or layer LoRA Lab cannot train, or one that does not fit the model."""
    path = path.expanduser()
    if not path.is_file():
        raise LoraLabError(f"init_lora {path}: no such file. Give the path of a .safetensors LoRA.")
    header = check_lora(path)
    metadata = header["__metadata__"]
    kinds, shapes, others = layer_keys(header)
    family = model.family
    made_for = _made_for(metadata)
    for key in others:
        suffix = key.rsplit(".", 1)[-1]
        if suffix == "dora_scale":
            raise LoraLabError(f"init_lora {path.name} holds DoRA's magnitude beside LyCORIS factors ({key}); LoRA "
                               "Lab trains DoRA on LoRA layers only. Start from a LoRA, DoRA, LoHa or LoKr file.")
        if suffix not in DIFFERENCES:
            raise LoraLabError(f"init_lora {path.name} holds {key}, a kind of tensor LoRA Lab does not train (it "
                               "trains LoRA, DoRA, LoHa and LoKr).")
    types = {adapter.name for layer_kinds in kinds.values() for adapter in layer_kinds}
    if len(types) != 1:
        found = " and ".join(sorted(get_adapter(name).title for name in types)) or "no adapter layers"
        raise LoraLabError(f"init_lora {path.name} holds {found}: start from a file of one adapter type.")
    adapter = get_adapter(types.pop())
    aliases = _layer_aliases(model)
    data = path.read_bytes()  # read once: hashed for the record, then parsed
    tensors_in_file = load_tensor_bytes(data)
    diffusers_alphas = _diffusers_alphas(metadata, path)
    modules: dict[str, list[str]] = {}
    tensors, layouts, alphas, ranks = {}, set(), [], set()
    for layer, layer_shapes in shapes.items():
        place = aliases.get(layer)
        if place is None:
            raise _does_not_fit(path, layer, model, made_for)
        problem = adapter.start_problem(layer_shapes)
        if problem:
            raise LoraLabError(f"init_lora {path.name}: layer {layer} {problem}. Start from another file.")
        prefix, module_path, layout = place
        layouts.add(layout)
        modules.setdefault(prefix, []).append(module_path)
        try:
            name = family.layer_name(prefix, module_path)
        except LoraLabError:
            raise LoraLabError(f"init_lora {path.name} has layer {layer} ({module_path}), which LoRA Lab cannot "
                               f"write in the layout every {family.title} LoRA loader reads; start from a file "
                               "without it.") from None
        for suffix in layer_shapes:
            tensors[f"{name}.{adapter.our_suffix(suffix, family)}"] = tensors_in_file[f"{layer}.{suffix}"]
        alpha = tensors_in_file.get(f"{layer}.alpha")
        if alpha is None and layout == "diffusers":
            alpha = diffusers_alphas.get(layer.split(".", 1)[0])
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        alphas.append(float(alpha) if alpha is not None else None)
        ranks.add(adapter.rank_of(layer_shapes))
    differences = {}
    for key in others:
        layer, suffix = key.rsplit(".", 1)
        place = aliases.get(layer)
        if place is None or place[0] != family.denoiser_prefix:
            raise _does_not_fit(path, layer, model, made_for)
        differences[key] = (f"{place[1]}.{DIFFERENCES[suffix]}", tensors_in_file[key])
        layouts.add(place[2])
    if not modules:
        raise LoraLabError(f"init_lora {path.name} holds no {adapter.title} layers to train; start from a file "
                           "that has some.")
    ranks.discard(None)
    if len(ranks) > 1:
        raise LoraLabError(f"init_lora {path.name} has layers of ranks {', '.join(map(str, sorted(ranks)))}; LoRA "
                           "Lab trains one rank for every layer, so start from a file of one rank.")
    rank = ranks.pop() if ranks else _int(metadata.get("ss_network_dim"))
    given = [a for a in alphas if a is not None]
    alpha = Counter(given).most_common(1)[0][0] if given else float(rank or 0)
    if len(layouts) > 1:
        log.info("init_lora %s names its layers in several layouts (%s)", path.name, ", ".join(sorted(layouts)))
    return StartingAdapter(name=path.name, sha256=hashlib.sha256(data).hexdigest(), layout="/".join(sorted(layouts)),
                           adapter=adapter.name, rank=rank, alpha=alpha,
                           options=adapter.options_of(list(shapes.values())),
                           hints=adapter.build_hints(list(shapes.values())),
                           modules=modules, tensors=tensors, differences=differences)


def has_text_encoder_layers(path: str | Path) -> bool:
    """Whether a starting file also trains the text encoder, read from its header alone (a ComfyUI
    graph loads its text encoder for training only when the run trains it)."""
    if not path or not Path(path).is_file():
        return False
    return any(layer.startswith(TEXT_ENCODER_LAYERS) for layer in layer_keys(check_lora(Path(path)))[1])


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _does_not_fit(path: Path, layer: str, model: LoadedModel, made_for: str) -> LoraLabError:
    family = model.family
    if layer.startswith(TEXT_ENCODER_LAYERS) and not model.text_encoders:
        return LoraLabError(f"init_lora {path.name} also trains the text encoder ({layer}), which LoRA Lab does not "
                            f"train for {family.title}. Start from a file without text-encoder layers.")
    if layer.startswith("diffusion_model.") and not model.original_names:
        return LoraLabError(f"init_lora {path.name} names its layers as ComfyUI does ({layer}). LoRA Lab reads that "
                            "layout for SD 1.5 and SDXL models loaded by ComfyUI (Train LoRA's init_lora), not from "
                            "the command line, and not for FLUX or Z-Image, whose original layouts fuse the q, k and "
                            "v layers that LoRA Lab trains apart. Start from a file in diffusers' or kohya's layout.")
    return LoraLabError(f"init_lora {path.name} has layer {layer}, which this {family.title} model does not have"
                        f"{made_for}: it was trained for another model family or layout. Start from a "
                        f"{family.title} LoRA (kohya, diffusers or LyCORIS layout).")


def starting_values(config: TrainingConfig, start: StartingAdapter, model: LoadedModel) -> dict[str, Any]:
    """The settings the file decides (type, rank, alpha, options, targets, text encoder); a setting
    given explicitly that disagrees with the file is refused, naming both values (left at its
    default, it follows the file)."""
    lora = config.lora
    taken: dict[str, Any] = {"adapter": start.adapter, **start.options}
    if start.rank:
        taken["rank"] = start.rank
    if start.alpha:
        taken["alpha"] = start.alpha
    if start.trains_text_encoder:
        taken["train_text_encoder"] = True
    defaults = TrainingConfig()
    for name, value in taken.items():
        given = getattr(lora, name)
        if given != defaults.value(name) and given != value:
            raise LoraLabError(f"{name} = {given!r}, but init_lora {start.name} was trained with {name} = {value!r}; "
                               f"leave {name} at {defaults.value(name)!r} to take the file's, or start from another "
                               "file.")
    if lora.train_text_encoder and not start.trains_text_encoder:
        raise LoraLabError(f"train_text_encoder is on, but init_lora {start.name} has no text-encoder layers; turn "
                           "it off, or start from a file that has them.")
    targets = targets_of(model, start)
    if lora.targets not in (defaults.lora.targets, targets):
        raise LoraLabError(f"targets = {lora.targets!r}, but init_lora {start.name} has the layers of targets = "
                           f"{targets!r}, which the run trains; leave targets at {defaults.lora.targets!r} to take "
                           "the file's.")
    return {**taken, "targets": targets}


def targets_of(model: LoadedModel, start: StartingAdapter) -> str:
    """The file's denoiser layers as a targets setting: the family's named set they are, else their
    module name endings (what the run's metadata and a later run from its settings read)."""
    family = model.family
    paths = set(start.modules.get(family.denoiser_prefix, []))
    adaptable = [path for path, module in model.denoiser.named_modules()
                 if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]
    def ends(path: str, ending: str) -> bool:  # PEFT's match of a target module name
        return path == ending or path.endswith(f".{ending}")

    for name, endings in family.target_sets.items():
        if paths == {path for path in adaptable if any(ends(path, e) for e in endings)}:
            return name
    known = sorted({e for endings in family.target_sets.values() for e in endings}, key=len, reverse=True)
    return ",".join(sorted({next((e for e in known if ends(path, e)), path.rsplit(".", 1)[-1]) for path in paths}))


def apply_starting_weights(model: LoadedModel, start: StartingAdapter) -> None:
    """After add_lora(modules=start.modules): the file's tensors into the adapter, and its weight
    differences into copies of the base tensors they change (kept in model.carried)."""
    from .export import load_tensors

    try:
        load_tensors(model, start.tensors, start.name)
    except LoraLabError as error:
        hint = (" ComfyUI's training nodes split a convolution's kernel between LoKr's two factors, where PEFT and "
                "LyCORIS keep it in the second, so such a layer (here the first convolution, with few input "
                "channels) cannot be rebuilt exactly. Start from a LoRA or LoHa, or a LoKr from another trainer."
                if start.adapter == "lokr" and "ComfyUI" in start.layout else "")
        raise LoraLabError(f"init_lora cannot start from this file as it is: {error}{hint}") from None
    with torch.no_grad():
        for key, (parameter_path, difference) in start.differences.items():
            module_path, name = parameter_path.rsplit(".", 1)
            module = model.denoiser.get_submodule(_adapted_path(model.denoiser, module_path))
            base = getattr(module, name)
            if base is None or base.shape != difference.shape:
                raise LoraLabError(f"init_lora {start.name}: {key} has shape {tuple(difference.shape)}, the model's "
                                   f"{parameter_path} {tuple(base.shape) if base is not None else 'is absent'}.")
            changed = torch.nn.Parameter((base.float() + difference.to(base.device).float()).to(base.dtype),
                                         requires_grad=False)
            changed.lora_lab_own = True  # not ComfyUI's shared tensor: kept over a background run's pause
            setattr(module, name, changed)
            model.carried[key] = difference.contiguous()


def _adapted_path(root: torch.nn.Module, path: str) -> str:
    """A module's path after PEFT wrapped it (its weights are on `base_layer`)."""
    module = root.get_submodule(path)
    return f"{path}.base_layer" if hasattr(module, "base_layer") else path


def starting_record(start: StartingAdapter) -> dict[str, str]:
    """Metadata entries naming the file a run started from."""
    return {"lora_lab.init_lora": start.name, "lora_lab.init_lora_sha256": start.sha256,
            "lora_lab.init_lora_layout": start.layout}
