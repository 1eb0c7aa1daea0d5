"""The one module that imports ComfyUI. Everything the nodes need from it passes through here:
the V3 node API, model folders, LoRA patching and sampling, progress, Cancel, and the few model
internals the conversion to the trainer's model (graph_model.py) reads. A thin façade: no
decisions are made here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io, ui
from PIL import Image

from ..trainer.errors import LoraLabError
from ..trainer.loop import StepReport, TrainingCommands
from ..trainer.lora_files import check_lora
from .panel_events import PanelEvents

__all__ = ["ComfyExtension", "io", "ui", "SAMPLERS", "SCHEDULERS", "DATASET", "RUN", "STACK"]
SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS
LORA_SUBFOLDER = "lora_lab"
DATASET = io.Custom("LORA_LAB_DATASET")
RUN = io.Custom("LORA_LAB_RUN")
STACK = io.Custom("LORA_STACK")  # list of (lora name, model strength, clip strength), as other packs use


class _LoraNameType(str):
    """The type of an output carrying a LoRA's name as LoraLoader lists it. To the frontend it is
    "COMBO", so the output links to combo inputs; to the server's link check (which compares types
    with `!=` and honours a type's own __ne__, comfy_execution/validation.py) it matches exactly the
    inputs that list the loras folder (LoraLoader's lora_name), and no other combo."""

    def __ne__(self, other: object) -> bool:
        if isinstance(other, list):  # a list of LoRA files (LoraLoader's, or Apply LoRA Stack's with "None")
            return [name for name in other if name != "None"] != lora_names()
        if other == "*":  # inputs that take any type (Preview Any, switches, reroutes)
            return False
        return str.__ne__(self, other)

    def __eq__(self, other: object) -> bool:
        return not self.__ne__(other)

    __hash__ = str.__hash__


@functools.cache
def server_checks_combos() -> bool:
    """Whether this ComfyUI checks a queued V3 combo value against its options (current releases
    do; 0.3.x checks only combos whose type is the list of choices, as V1 nodes declare them)."""
    try:
        import inspect

        import execution
    except ImportError:  # not running inside the server (unit tests)
        return False
    return "io.Combo.io_type" in inspect.getsource(execution.validate_inputs)


class ListedCombo(io.Combo.Input):
    """A combo of files that the server checks against its list, blaming the one input that holds
    a missing name: on a ComfyUI that does not check V3 combos, its type is its list of choices, as
    ComfyUI's own file pickers (LoraLoader's lora_name) are declared."""

    def __init__(self, id: str, options: list[str], **details: Any) -> None:  # noqa: A002 - ComfyUI's name
        super().__init__(id, options=options, **details)
        self.choices = list(options)

    def get_io_type(self) -> Any:
        return super().get_io_type() if server_checks_combos() else self.choices


def folded(widget: Any) -> Any:
    """A widget folded away until the user asks for all settings: ComfyUI's own "advanced" flag where
    the API has it (the frontend folds such inputs), else the same flag in the input's options,
    where web/lora_lab.js reads it (ComfyUI 0.3.x)."""
    if hasattr(widget, "advanced"):
        widget.advanced = True
    else:
        widget.extra_dict["advanced"] = True
    return widget


def schema_extras(search_aliases: list[str]) -> dict[str, Any]:
    """Schema fields this ComfyUI knows (search aliases came after 0.3.x)."""
    import inspect

    return {"search_aliases": search_aliases} if "search_aliases" in inspect.signature(io.Schema).parameters else {}


LORA_NAME = io.Custom("COMBO")
LORA_NAME.io_type = _LoraNameType("COMBO")  # io.Custom wraps the name in its own str type; ours decides matches
CELL_EVENT = "lora_lab.cell"
log = logging.getLogger(__name__)


# --- folders ---------------------------------------------------------------------------------

def lora_root() -> Path:
    """models/loras (the first loras folder): ComfyUI's LoraLoader lists what is saved here."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> Path:
    """A LoRA name as LoraLoader lists it, as a file inside one of the loras folders (a name
    from a stranger's workflow or another node's stack may try to point elsewhere)."""
    path = folder_paths.get_full_path("loras", name)
    roots = [os.path.abspath(root) for root in folder_paths.get_folder_paths("loras")]
    if path is None or not any(os.path.abspath(path).startswith(root + os.sep) for root in roots):
        raise LoraLabError(f"LoRA {name!r} is not in the loras folder; refresh the page (R) or pick another.")
    return Path(path)


def lora_display_name(path: Path) -> str:
    """A LoRA file's name as LoraLoader lists it (relative to its loras folder)."""
    for root in folder_paths.get_folder_paths("loras"):
        with contextlib.suppress(ValueError):
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
    return path.name


def relative_to_comfy(path: Path) -> str:
    """A folder as a message names it: relative to ComfyUI's own folder, never the machine's layout."""
    try:
        return Path(path).resolve().relative_to(Path(folder_paths.base_path).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def server_is_local() -> bool:
    """Whether ComfyUI listens on the loopback address only (its default). Started with --listen
    beyond it, strangers on the network can queue workflows, so datasets are read only from folders
    the owner allows (nodes/load_dataset.py)."""
    try:
        from comfy.cli_args import args
    except ImportError:  # not inside the server (unit tests)
        return True
    hosts = [host.strip().strip("[]") for host in str(getattr(args, "listen", "127.0.0.1")).split(",")]
    return all(host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.") for host in hosts if host)


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def captioner_root() -> Path:
    """models/captioners: where the Caption node finds captioning models (one folder each)."""
    return Path(folder_paths.models_dir) / "captioners"


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


# --- images ----------------------------------------------------------------------------------

def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C floats in 0..1) to PIL images."""
    array = (images.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(frame[..., :3]) for frame in array]


def masks_to_pil(masks: torch.Tensor) -> list[Image.Image]:
    """ComfyUI MASK ((B, H, W) or (H, W) floats in 0..1) to grayscale PIL images (255 = 1)."""
    array = masks.detach().cpu().float().clamp(0, 1)
    array = (array[None] if array.dim() == 2 else array).numpy()
    return [Image.fromarray((frame * 255).round().astype(np.uint8), "L") for frame in array]


def pil_to_images(pictures: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), np.float32) / 255.0) for p in pictures])


def text_and_preview(text: str, picture: Image.Image | None, cls: type) -> dict:
    """What a node shows: its text (web/lora_lab.js puts it on the node) and a preview image."""
    shown: dict = {"text": (text,)}
    if picture is not None:
        shown.update(ui.PreviewImage(pil_to_images([picture]), cls=cls).as_dict())
    return shown


# --- training inside ComfyUI -----------------------------------------------------------------

@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI runs every prompt under inference_mode; training has to leave it."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def free_memory_for_training(model: Any, clip: Any = None) -> None:
    """Unload every cached model but the one we train, then load that one whole (and the CLIP too,
    when its text encoder trains: loaded in the same call, so neither evicts the other)."""
    comfy.model_management.unload_all_models()
    comfy.model_management.load_models_gpu([model, *([clip.patcher] if clip is not None else [])],
                                           force_full_load=True)


def release_training_memory() -> None:
    gc.collect()
    comfy.model_management.soft_empty_cache()


# --- what the model conversion (graph_model.py) needs of ComfyUI ------------------------------

def model_config(model: Any) -> Any:
    """ComfyUI's config of a MODEL (comfy.supported_models), with its unet_config."""
    return model.model.model_config


def model_class_lineage(model: Any) -> list[str]:
    """The names of the MODEL's config class and its bases, most specific first (e.g. Segmind_Vega, SDXL)."""
    return [cls.__name__ for cls in type(model_config(model)).__mro__]


def unet_to_diffusers(unet_config: dict) -> dict:
    return comfy.utils.unet_to_diffusers(unet_config)


def to_diffusers_table(name: str, config: dict, needs: str) -> dict:
    """ComfyUI's own table from diffusers names to its model's (comfy.utils.<name>_to_diffusers):
    a key, (key, (dim, start, length)) for a slice of a fused tensor, or (key, None, fn) for a
    reordered one. `needs` names the ComfyUI release that brought it, for older ones."""
    table = getattr(comfy.utils, f"{name}_to_diffusers", None)
    if table is None:
        raise LoraLabError(f"This ComfyUI ({comfy_version()}) cannot map its model to diffusers for training; "
                           f"update ComfyUI to {needs} or later.")
    return table(config)


def comfy_version() -> str:
    try:
        import comfyui_version

        return f"version {comfyui_version.__version__}"
    except ImportError:
        return "an unknown version"


def latent_format(model: Any) -> Any:
    return model.model.latent_format


def _leave_inference_mode(module: torch.nn.Module) -> None:
    """Weights loaded while ComfyUI was in inference mode cannot take part in autograd. Swap each
    for a normal tensor of the same values, one at a time, so no second copy of the model exists."""
    for owner in module.modules():
        for name, tensor in list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False)):
            if tensor.is_inference():
                fresh = tensor.detach().clone()
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(owner, name, torch.nn.Parameter(fresh, requires_grad=False))
                else:
                    owner.register_buffer(name, fresh)


def diffusion_model(model: Any) -> torch.nn.Module:
    """ComfyUI's own diffusion model module of a MODEL (read only)."""
    return model.model.diffusion_model


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The diffusion model's own tensors (not copies), usable by autograd."""
    _leave_inference_mode(model.model.diffusion_model)
    return model.model.diffusion_model.state_dict(keep_vars=True)


def prediction_type(model: Any) -> str:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "epsilon"
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    raise LoraLabError(f"This model predicts with {type(sampling).__name__}, which Train LoRA does not support yet.")


def encode_pooled(clip: Any, text: str, stage: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption's text conditioning and pooled vector, as the graph's CLIP makes them; with `stage`
    (a copy of its text-encoder modules, `trainable_text_stage`) through that copy, by the same
    steps as ComfyUI's CLIP.encode_from_tokens: its tokenizer, its clip-skip layer, its weighting."""
    tokens = clip.tokenize(text)
    if stage is None:
        return clip.encode_from_tokens(tokens, return_pooled=True)
    stage.reset_clip_options()
    if clip.layer_idx is not None:
        stage.set_clip_options({"layer": clip.layer_idx})
    stage.set_clip_options({"execution_device": clip.patcher.load_device})  # older ComfyUI ignores it
    cond, pooled = stage.encode_token_weights(tokens)[:2]
    return cond, pooled


def trainable_text_stage(clip: Any) -> torch.nn.Module:
    """A copy of the CLIP's text-encoder modules (`cond_stage_model`) that holds ComfyUI's own
    tensors (loaded and patched as this graph has them, usable by autograd), not copies of them:
    adapter layers go into the copy, so the graph's CLIP, its patches and its cache stay as they are."""
    stage = text_stage(clip)
    shared = {id(tensor): tensor for tensor in (*stage.parameters(), *stage.buffers())}
    trainable = copy.deepcopy(stage, shared)
    for module in trainable.modules():
        # ComfyUI's CLIP layers add their residuals in place (`x += attention(norm(x))`) into the
        # tensor the norm has just read, which autograd needs unchanged: the norm reads a copy.
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(_own_input)
    return trainable


def _own_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].clone(), *args[1:])


def text_stage(clip: Any) -> torch.nn.Module:
    """The CLIP's own text-encoder modules, their tensors usable by autograd (read, not changed)."""
    _leave_inference_mode(clip.cond_stage_model)
    return clip.cond_stage_model


class NodeEvents(PanelEvents, TrainingCommands):
    """A foreground run: the panel's events, the progress bar on the node and the queue, and Cancel
    as a stop."""

    def __init__(self, node_id: str | None, run: str, total_steps: int) -> None:
        super().__init__(node_id, run, send)
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.interrupted = False

    def on_step(self, report: StepReport) -> None:
        super().on_step(report)
        # The progress hook raises on Cancel and clears the flag; the loop must save first, so
        # Cancel is noted here and acted on in should_stop.
        if comfy.model_management.processing_interrupted():
            self.interrupted = True
            return
        try:
            self.bar.update_absolute(report.step, report.total_steps)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True

    def should_stop(self) -> bool:
        self.interrupted = self.interrupted or comfy.model_management.processing_interrupted()
        return self.interrupted


def send(event: str, data: dict) -> None:
    """A websocket event to every open browser tab (a second tab follows the run too)."""
    server = _prompt_server()
    if server is not None:
        server.send_sync(event, data)


def _prompt_server() -> Any:
    try:
        from server import PromptServer
    except ImportError:  # not running inside the server (unit tests)
        return None
    return PromptServer.instance


def add_json_route(path: str, handler: Callable[[dict[str, str]], tuple[int, Any]], method: str = "get") -> None:
    """A route on ComfyUI's server answering JSON: `handler(query)` returns (status, body); for a
    POST the JSON body's fields join the query's."""
    from aiohttp import web

    async def respond(request: Any) -> Any:
        fields = dict(request.rel_url.query)
        if method == "post" and request.can_read_body:
            try:
                body = await request.json()
            except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
                return web.json_response({"error": "the body must be a small JSON object"}, status=400)
            if isinstance(body, dict):  # only plain fields are read; anything nested is not a field
                fields.update({key: str(value) for key, value in body.items() if isinstance(value, str | int | float)})
        status, answer = handler(fields)
        return web.json_response(answer, status=status)

    server = _prompt_server()
    if server is not None:
        getattr(server.routes, method)(path)(respond)


def run_prompts_in_turns(take_turn: Callable[[], contextlib.AbstractContextManager]) -> bool:
    """Every prompt ComfyUI executes runs inside `take_turn()` (background jobs, nodes/jobs.py, use
    the device between prompts). Wraps the executor's `execute` once, for the whole server; False
    where this ComfyUI has no such method (background training is then refused)."""
    try:
        import execution
    except ImportError:  # not running inside the server (unit tests)
        return False
    executor = getattr(execution, "PromptExecutor", None)
    original = getattr(executor, "execute", None)
    if original is None:
        log.warning("LoRA Lab: this ComfyUI has no PromptExecutor.execute; background training is off.")
        return False
    if getattr(original, "lora_lab_turns", False):
        return True

    @functools.wraps(original)
    def execute_in_turn(self: Any, *args: Any, **kwargs: Any) -> Any:
        with take_turn():
            return original(self, *args, **kwargs)

    execute_in_turn.lora_lab_turns = True
    executor.execute = execute_in_turn
    return True


def blocked(message: str | None) -> Any:
    """An output value that stops the nodes using it, with `message` shown as their error, or
    quietly when None (the rest of the prompt runs on)."""
    from comfy_execution.graph import ExecutionBlocker

    return ExecutionBlocker(message)


class NodeProgress:
    """ComfyUI's progress bar on a node (k of n); Cancel raises ComfyUI's interrupt at each update."""

    def __init__(self, node_id: str | None, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total

    def update(self, done: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, self.total)


def raise_interrupted() -> None:
    """Make ComfyUI show the run as interrupted (after the checkpoint was saved)."""
    comfy.model_management.interrupt_current_processing(True)
    comfy.model_management.throw_exception_if_processing_interrupted()


# --- applying LoRAs and sampling --------------------------------------------------------------

def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    check_lora(path)  # a malformed file is refused with its fault named, before ComfyUI reads it
    try:
        return comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as error:
        raise LoraLabError(f"Could not read LoRA {path.name} ({error}); is it a complete .safetensors file?") from None


def apply_lora(model: Any, clip: Any, lora: dict[str, torch.Tensor], model_strength: float,
               clip_strength: float) -> tuple[Any, Any]:
    """ComfyUI's own LoRA patching (what LoraLoader does); never mutates its inputs."""
    if model_strength == 0 and clip_strength == 0:
        return model, clip
    return comfy.sd.load_lora_for_models(model, clip, lora, model_strength, clip_strength)


def apply_loras(model: Any, clip: Any, chain: list[tuple[dict[str, torch.Tensor], float, float]]) -> tuple[Any, Any]:
    """(LoRA, model strength, clip strength) applied in order, as LoraLoader after LoraLoader."""
    for lora, model_strength, clip_strength in chain:
        model, clip = apply_lora(model, clip, lora, model_strength, clip_strength)
    return model, clip


def is_guidance_distilled(model: Any) -> bool:
    """FLUX.1-dev and its kind: guidance is an input of the model, not classifier-free."""
    return bool(model_config(model).unet_config.get("guidance_embed"))


def encode_text(clip: Any, text: str) -> list:
    """What CLIPTextEncode makes of a text."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def text_encoder_changed(base: Any, patched: Any) -> bool:
    """Whether applying a LoRA changed the text encoder. ComfyUI's patched CLIP is a clone holding
    the base's patches plus the LoRA's text-encoder patches: none for a LoRA without text-encoder
    keys (every FLUX LoRA LoRA Lab trains) or at clip strength 0, and then it encodes as the base."""
    if patched is base:
        return False
    if not hasattr(base, "patcher") or not hasattr(patched, "patcher"):
        return True  # not a CLIP we can look into: assume it changed

    def patch_count(clip: Any) -> int:
        return sum(len(patches) for patches in clip.patcher.patches.values())

    return patch_count(patched) != patch_count(base)


def zeroed(conditioning: list) -> list:
    """ConditioningZeroOut's output: a FLUX.1-dev graph's negative, which sampling at cfg 1 never
    evaluates; saves encoding a negative prompt through T5-XXL."""
    return [[torch.zeros_like(cond), {key: torch.zeros_like(value) if key == "pooled_output" else value
                                      for key, value in extra.items()}] for cond, extra in conditioning]


def sample_image(model: Any, vae: Any, positive: list, negative: list | None, seed: int, steps: int, cfg: float,
                 sampler: str, scheduler: str, width: int, height: int) -> torch.Tensor:
    """One image exactly as EmptyLatentImage → CLIPTextEncode → KSampler → VAEDecode would make it
    from these encodings (for FLUX.1-dev, with FluxGuidance at `cfg` and ConditioningZeroOut's
    negative; `negative` may then be None)."""
    # The empty latent the model's own Empty*LatentImage node makes: FLUX.1's and Z-Image's have 16
    # channels at 1/8, FLUX.2's 128 at 1/16.
    latent_format = model.get_model_object("latent_format")
    ratio = getattr(latent_format, "spacial_downscale_ratio", 8)
    latent = torch.zeros([1, latent_format.latent_channels, height // ratio, width // ratio],
                         device=comfy.model_management.intermediate_device())
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    if is_guidance_distilled(model):  # FLUX.1-dev: cfg is its distilled guidance, as FluxGuidance sets it
        positive, negative = [[cond, {**extra, "guidance": cfg}] for cond, extra in positive], zeroed(positive)
        cfg = 1.0
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    return vae.decode(samples)[:1]
