"""The one module that imports ComfyUI. Everything the nodes need from it passes through here:
the V3 node API, model folders, LoRA patching and sampling, progress, Cancel, and the conversion
of a graph's MODEL/CLIP/VAE into the trainer's `LoadedModel` (sharing the base weights).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io, ui
from PIL import Image

from ..trainer.errors import LoraLabError
from ..trainer.families import LoadedModel, get_family
from ..trainer.fp8 import FLOAT8, Float8Linear
from ..trainer.loop import Checkpoint, StepReport, TrainingEvents
from ..trainer.lora_files import check_lora

__all__ = ["ComfyExtension", "io", "ui", "SAMPLERS", "SCHEDULERS", "DATASET", "RUN", "STACK"]
SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS
LORA_SUBFOLDER = "lora_lab"
DATASET = io.Custom("LORA_LAB_DATASET")
RUN = io.Custom("LORA_LAB_RUN")
STACK = io.Custom("LORA_STACK")  # list of (lora name, model strength, clip strength), as other packs use
PROGRESS_EVENT = "lora_lab.progress"


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


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


# --- images ----------------------------------------------------------------------------------

def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C floats in 0..1) to PIL images."""
    array = (images.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(frame[..., :3]) for frame in array]


def pil_to_images(pictures: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), np.float32) / 255.0) for p in pictures])


# --- training inside ComfyUI -----------------------------------------------------------------

@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI runs every prompt under inference_mode; training has to leave it."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def free_memory_for_training(model: Any) -> None:
    """Unload every cached model but the one we train, then load that one whole."""
    comfy.model_management.unload_all_models()
    comfy.model_management.load_models_gpu([model], force_full_load=True)


def release_training_memory() -> None:
    gc.collect()
    comfy.model_management.soft_empty_cache()


def family_of(model: Any) -> str:
    """The trainer family of a graph's MODEL, or a clear error for models LoRA Lab does not train."""
    config = model.model.model_config
    supported = comfy.supported_models
    standard_input = config.unet_config.get("in_channels") in (4, 16)  # not an inpainting / edit variant
    if isinstance(config, supported.Flux) and standard_input:
        return "flux"
    if isinstance(config, supported.SDXL) and standard_input:
        return "sdxl"
    if type(config).__name__ == "SD15":
        return "sd15"
    raise LoraLabError(f"Train LoRA trains SD 1.5, SDXL and FLUX.1 models; this graph's model is "
                       f"{type(config).__name__}. Load one of those.")


# How ComfyUI's CLIP output becomes the trainer's conditioning, per family: the pooled vector's
# name, and how many tokens are kept so that every caption's conditioning has one shape (77 for
# CLIP; 256 for FLUX's T5, the length ComfyUI itself pads prompts to).
POOLED_NAME = {"sd15": None, "sdxl": "text_embeds", "flux": "pooled_projections"}
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "flux": 256}


def _diffusers_unet_config(unet_config: dict) -> dict:
    """The diffusers UNet2DConditionModel config of a ComfyUI (ldm) UNet."""
    per_block = unet_config["num_res_blocks"]
    if len(set(per_block)) != 1:
        raise LoraLabError("This UNet has a different number of layers per block, which diffusers cannot build.")
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    depth = [unet_config["transformer_depth"][i * per_block[0]] for i in range(len(channels))]
    heads = unet_config.get("num_heads", -1)
    head_dim = heads if heads != -1 else [c // unet_config["num_head_channels"] for c in channels]
    adm = unet_config.get("adm_in_channels")  # SDXL: pooled text + size/crop ids
    extra = ({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
              "projection_class_embeddings_input_dim": adm} if adm else {})
    return {
        **extra,
        "sample_size": unet_config.get("image_size", 64), "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"], "block_out_channels": channels,
        "layers_per_block": per_block[0], "cross_attention_dim": unet_config["context_dim"],
        "attention_head_dim": head_dim, "use_linear_projection": unet_config.get("use_linear_in_transformer", False),
        "transformer_layers_per_block": [max(1, d) for d in depth],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
    }


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


def shared_diffusers_unet(model: Any) -> torch.nn.Module:
    """A diffusers UNet whose weights *are* the ComfyUI model's tensors (no copy, no extra memory)."""
    from diffusers import UNet2DConditionModel

    unet_config = model.model.model_config.unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_diffusers_unet_config(unet_config))
    unet.requires_grad_(False)
    _leave_inference_mode(model.model.diffusion_model)
    ldm = model.model.diffusion_model.state_dict(keep_vars=True)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    # ComfyUI's map names SDXL's pooled-text/size embedding by its older diffusers name.
    state = {name.replace("class_embedding.", "add_embedding."): ldm[ldm_name] for name, ldm_name in mapping.items()
             if ldm_name in ldm}
    missing = sorted(set(unet.state_dict()) - set(state))
    if missing:
        raise LoraLabError(f"Could not map this model's UNet to diffusers (e.g. {missing[0]} missing); "
                           "please report the checkpoint.")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def shared_diffusers_flux(model: Any) -> torch.nn.Module:
    """A diffusers FLUX transformer whose weights are views of the ComfyUI model's tensors (the
    fused q/k/v projections are sliced, not copied); weights ComfyUI holds in fp8 stay fp8."""
    from diffusers import FluxTransformer2DModel

    config = model.model.model_config.unet_config
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=config["in_channels"] * 4, num_layers=config["depth"],
            num_single_layers=config["depth_single_blocks"], num_attention_heads=config["num_heads"],
            attention_head_dim=config["hidden_size"] // config["num_heads"],
            joint_attention_dim=config["context_in_dim"], pooled_projection_dim=config["vec_in_dim"],
            guidance_embeds=config["guidance_embed"], axes_dims_rope=tuple(config["axes_dim"]))
    transformer.requires_grad_(False)
    _leave_inference_mode(model.model.diffusion_model)
    bfl = model.model.diffusion_model.state_dict(keep_vars=True)
    wanted = transformer.state_dict().keys()
    state = {}
    for name, source in comfy.utils.flux_to_diffusers(config).items():
        if name not in wanted:
            continue
        if isinstance(source, str):
            state[name] = bfl[source]
        elif source[1] is None:  # a reordered tensor (the final norm's scale/shift halves): a small copy
            state[name] = source[2](bfl[source[0]].detach())
        else:
            dim, start, length = source[1]
            state[name] = bfl[source[0]].detach().narrow(dim, start, length)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise LoraLabError(f"Could not map this FLUX model to diffusers (e.g. {missing[0]} missing); please report "
                           "the model file.")
    transformer.load_state_dict(state, strict=True, assign=True)
    for module in transformer.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == FLOAT8:
            module.register_buffer("weight_scale", torch.ones(module.out_features, device=module.weight.device))
            module.compute_dtype = torch.bfloat16
            module.__class__ = Float8Linear
    for module in transformer.modules():  # other fp8 tensors (norms, embedders) are small: upcast them
        for key, tensor in list(module.named_parameters(recurse=False)):
            if tensor.dtype == FLOAT8 and not isinstance(module, Float8Linear):
                setattr(module, key, torch.nn.Parameter(tensor.to(torch.bfloat16), requires_grad=False))
    return transformer


def prediction_type(model: Any) -> str:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "epsilon"
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    raise LoraLabError(f"This model predicts with {type(sampling).__name__}, which Train LoRA does not support yet.")


def loaded_model(model: Any, clip: Any, vae: Any) -> LoadedModel:
    """The trainer's view of a graph's MODEL, CLIP and VAE: a diffusers denoiser sharing the
    weights, and conditioning/latents computed by the graph's own CLIP and VAE."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    name = family_of(model)
    free_memory_for_training(model)
    denoiser = shared_diffusers_flux(model) if name == "flux" else shared_diffusers_unet(model)
    latent_format = model.model.latent_format
    pooled_name, tokens = POOLED_NAME[name], TEXT_TOKENS[name]

    def encode_prompts(captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = [clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True) for caption in captions]
        conditioning = {"prompt_embeds": torch.cat([cond[:, :tokens] for cond, _ in encoded]).clone()}
        if pooled_name:
            conditioning[pooled_name] = torch.cat([pooled for _, pooled in encoded]).clone()
        return conditioning

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        raw = vae.encode(((pixels + 1) / 2).clamp(0, 1).movedim(1, -1))
        return latent_format.process_in(raw).clone()

    if name == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    else:  # ComfyUI's SD 1.x / SDXL sampling uses the same scaled-linear betas as diffusers' scheduler
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  num_train_timesteps=1000, clip_sample=False)
    return LoadedModel(family=get_family(name), denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[],
                       noise_scheduler=scheduler, prediction_type=prediction_type(model), source="comfyui",
                       prompt_encoder=encode_prompts, image_encoder=encode_images)


class NodeEvents(TrainingEvents):
    """Progress bar on the node and the queue, live loss over the websocket, Cancel as a stop."""

    def __init__(self, node_id: str | None, total_steps: int) -> None:
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.interrupted = False

    def on_step(self, report: StepReport) -> None:
        send(PROGRESS_EVENT, {"node": self.node_id, "step": report.step, "total": report.total_steps,
                              "loss": report.loss, "lr": report.learning_rate,
                              "seconds_per_step": report.seconds_per_step})
        # The progress hook raises on Cancel and clears the flag; the loop must save first, so
        # Cancel is noted here and acted on in should_stop.
        if comfy.model_management.processing_interrupted():
            self.interrupted = True
            return
        try:
            self.bar.update_absolute(report.step, report.total_steps)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        send("lora_lab.checkpoint", {"node": self.node_id, "step": checkpoint.step, "path": str(checkpoint.path)})

    def should_stop(self) -> bool:
        self.interrupted = self.interrupted or comfy.model_management.processing_interrupted()
        return self.interrupted


def send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # not running inside the server (unit tests)
        return
    if PromptServer.instance is not None:
        PromptServer.instance.send_sync(event, data)


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


def is_guidance_distilled(model: Any) -> bool:
    config = model.model.model_config
    return isinstance(config, comfy.supported_models.Flux) and bool(config.unet_config.get("guidance_embed"))


def encode_text(clip: Any, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_image(model: Any, clip: Any, vae: Any, prompt: str, negative: str, seed: int, steps: int, cfg: float,
                 sampler: str, scheduler: str, width: int, height: int) -> torch.Tensor:
    """One image exactly as EmptyLatentImage → CLIPTextEncode → KSampler → VAEDecode would make it."""
    latent = torch.zeros([1, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
    latent = comfy.sample.fix_empty_latent_channels(model, latent)  # FLUX latents have 16 channels
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative_cond = encode_text(clip, prompt), encode_text(clip, negative)
    if is_guidance_distilled(model):  # FLUX.1-dev: cfg is its distilled guidance, as FluxGuidance sets it
        positive = [[cond, {**extra, "guidance": cfg}] for cond, extra in positive]
        cfg = 1.0
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative_cond, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    return vae.decode(samples)[:1]
