"""A ComfyUI graph's MODEL, CLIP and VAE as the trainer's `LoadedModel`: the conversion registry.

Each family that can be trained from a graph has one entry here: how to recognise its ComfyUI
model class, and how to build a diffusers denoiser whose weights *are* ComfyUI's tensors (no copy:
the SD UNets map one to one; FLUX's fused q/k/v projections are sliced into views). Prompts and
images are encoded by the graph's own CLIP and VAE (`GraphEncoders`), so the conditioning trained
on is exactly what the graph samples with. Everything ComfyUI is reached through comfy_bridge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..trainer.errors import LoraLabError
from ..trainer.families import get_family
from ..trainer.families.base import Encoders, LoadedModel, ModelFamily, ModelIdentity
from ..trainer.fp8 import FLOAT8, Float8Linear, quantizable_layers
from ..trainer.lora_files import check_lora, layer_keys, other_family
from . import comfy_bridge as comfy


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


def shared_diffusers_unet(model: Any) -> torch.nn.Module:
    """A diffusers UNet whose weights *are* the ComfyUI model's tensors (no copy, no extra memory)."""
    from diffusers import UNet2DConditionModel

    unet_config = comfy.model_config(model).unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_diffusers_unet_config(unet_config))
    unet.requires_grad_(False)
    ldm = comfy.trainable_state_dict(model)
    state = {name: ldm[ldm_name] for name, ldm_name in unet_names(model).items() if ldm_name in ldm}
    missing = sorted(set(unet.state_dict()) - set(state))
    if missing:
        raise LoraLabError(f"Could not map this model's UNet to diffusers (e.g. {missing[0]} missing); "
                           "please report the checkpoint.")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def unet_names(model: Any) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI's (original) key, by ComfyUI's own table."""
    # ComfyUI's map names SDXL's pooled-text/size embedding by its older diffusers name.
    return {name.replace("class_embedding.", "add_embedding."): ldm_name
            for name, ldm_name in comfy.unet_to_diffusers(comfy.model_config(model).unet_config).items()}


def original_unet_names(model: Any) -> dict[str, str]:
    """How ComfyUI's own files (its training nodes' LoRAs) name the UNet's weights."""
    return {name: f"diffusion_model.{ldm_name}" for name, ldm_name in unet_names(model).items()}


def shared_diffusers_flux(model: Any) -> torch.nn.Module:
    """A diffusers FLUX transformer whose weights are views of the ComfyUI model's tensors (the
    fused q/k/v projections are sliced, not copied); weights ComfyUI holds in fp8 stay fp8."""
    from diffusers import FluxTransformer2DModel

    config = comfy.model_config(model).unet_config
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=config["in_channels"] * 4, num_layers=config["depth"],
            num_single_layers=config["depth_single_blocks"], num_attention_heads=config["num_heads"],
            attention_head_dim=config["hidden_size"] // config["num_heads"],
            joint_attention_dim=config["context_in_dim"], pooled_projection_dim=config["vec_in_dim"],
            guidance_embeds=config["guidance_embed"], axes_dims_rope=tuple(config["axes_dim"]))
    return _share_tensors(model, transformer, comfy.to_diffusers_table("flux", config, "0.3.0"), "FLUX")


def shared_diffusers_zimage(model: Any) -> torch.nn.Module:
    """A diffusers Z-Image transformer over the ComfyUI model's tensors (its fused q/k/v sliced)."""
    from diffusers import ZImageTransformer2DModel

    config = comfy.model_config(model).unet_config
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(
            in_channels=config["in_channels"], dim=config["dim"], n_layers=config["n_layers"],
            n_refiner_layers=config.get("n_refiner_layers", 2), n_heads=config["n_heads"],
            n_kv_heads=config["n_kv_heads"],
            cap_feat_dim=config["cap_feat_dim"], rope_theta=config["rope_theta"], t_scale=config["time_scale"],
            axes_dims=list(config["axes_dims"]), axes_lens=list(config["axes_lens"]))
    table = comfy.to_diffusers_table("z_image", config, "0.3.76")
    return _share_tensors(model, transformer, table, "Z-Image", get_family("zimage").fp8_kept)


# FLUX.2's global modulation and time embedders: ComfyUI's table (made for FLUX.1's names) has no
# diffusers name for them.
FLUX2_EXTRA_NAMES = {
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
}


def shared_diffusers_flux2(model: Any) -> torch.nn.Module:
    """A diffusers FLUX.2 transformer over the ComfyUI model's tensors (fused q/k/v sliced)."""
    from diffusers import Flux2Transformer2DModel

    config = comfy.model_config(model).unet_config
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=config["in_channels"], num_layers=config["depth"],
            num_single_layers=config["depth_single_blocks"], num_attention_heads=config["num_heads"],
            attention_head_dim=config["hidden_size"] // config["num_heads"],
            joint_attention_dim=config["context_in_dim"], mlp_ratio=config["mlp_ratio"],
            axes_dims_rope=tuple(config["axes_dim"]), rope_theta=config["theta"],
            guidance_embeds=config["guidance_embed"])
    table = {**comfy.to_diffusers_table("flux", config, "0.11"), **FLUX2_EXTRA_NAMES}
    return _share_tensors(model, transformer, table, "FLUX.2")


def _share_tensors(model: Any, transformer: torch.nn.Module, table: dict, title: str,
                   kept: str | None = None) -> torch.nn.Module:
    """Give a meta-device diffusers transformer the ComfyUI model's tensors by ComfyUI's own
    diffusers-name table: the same tensors, or views of their slices. Linear weights ComfyUI holds
    in fp8 stay fp8 (Float8Linear), but for those the family keeps precise (`kept`)."""
    transformer.requires_grad_(False)
    original = comfy.trainable_state_dict(model)
    wanted = transformer.state_dict().keys()
    state = {}
    for name, source in table.items():
        if name not in wanted:
            continue
        if isinstance(source, str):
            state[name] = original[source]
        elif source[1] is None:  # a reordered tensor (the final norm's scale/shift halves): a small copy
            state[name] = source[2](original[source[0]].detach())
        else:
            dim, start, length = source[1]
            state[name] = original[source[0]].detach().narrow(dim, start, length)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise LoraLabError(f"Could not map this {title} model to diffusers (e.g. {missing[0]} missing); please report "
                           "the model file.")
    transformer.load_state_dict(state, strict=True, assign=True)
    for module in quantizable_layers(transformer, kept):
        if module.weight.dtype == FLOAT8:
            module.register_buffer("weight_scale", torch.ones(module.out_features, device=module.weight.device))
            module.compute_dtype = torch.bfloat16
            module.__class__ = Float8Linear
    for module in transformer.modules():  # other fp8 tensors (norms, embedders) are small: upcast them,
        if isinstance(module, Float8Linear):  # to their module's other tensors' dtype (a bias's)
            continue
        tensors = dict(module.named_parameters(recurse=False))
        dtype = next((t.dtype for t in tensors.values() if t.dtype != FLOAT8), torch.bfloat16)
        for key, tensor in tensors.items():
            if tensor.dtype == FLOAT8:
                setattr(module, key, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))
    return transformer


@dataclass(frozen=True)
class Conversion:
    model_class: str  # ComfyUI's model config class (comfy.supported_models) or a base class of it
    exact: bool  # only that class, not its subclasses (SD 1.5's class is a base of others)
    accepts: Callable[[dict], bool]  # the unet_config of a variant this conversion handles
    denoiser: Callable[[Any], torch.nn.Module]
    # The denoiser's keys in ComfyUI's own files (LoadedModel.original_names); none for FLUX, whose
    # original layout fuses projections that diffusers keeps apart.
    original_names: Callable[[Any], dict[str, str]] = lambda model: {}
    # The text encoders text-encoder LoRA trains: their names in ComfyUI's CLIP (cond_stage_model),
    # in the order of the family's export prefixes (none: the family trains only its denoiser).
    text_encoders: tuple[str, ...] = ()
    needs: str = ""  # the first ComfyUI release that loads this model class and maps its LoRA keys


# ComfyUI model class -> trainer family, checked in this order (FLUX.2's class is a subclass of
# FLUX.1's, so it comes first). Adding a trainable family means an entry here (and its family module
# in trainer/families/). Inpainting and edit variants (more input channels) and FLUX.2 dev (Mistral
# text encoder, guidance embedding) are not accepted.
CONVERSIONS = {
    "flux2": Conversion("Flux2", exact=True, denoiser=shared_diffusers_flux2, needs="0.11",
                        accepts=lambda c: c.get("in_channels") == 128 and not c.get("guidance_embed")),
    "zimage": Conversion("ZImage", exact=True, denoiser=shared_diffusers_zimage, needs="0.3.76",
                         accepts=lambda c: c.get("in_channels") == 16 and not c.get("siglip_feat_dim")),
    "flux": Conversion("Flux", exact=False, denoiser=shared_diffusers_flux,
                       accepts=lambda c: c.get("in_channels") == 16 and c.get("image_model", "flux") == "flux"),
    "sdxl": Conversion("SDXL", exact=False, denoiser=shared_diffusers_unet,  # Vega, SSD-1B, KOALA too
                       accepts=lambda c: c.get("in_channels") == 4, original_names=original_unet_names,
                       text_encoders=("clip_l", "clip_g")),
    "sd15": Conversion("SD15", exact=True, denoiser=shared_diffusers_unet, accepts=lambda c: c.get("in_channels") == 4,
                       original_names=original_unet_names, text_encoders=("clip_l",)),
}


def family_of(model: Any) -> ModelFamily:
    """The trainer family of a graph's MODEL, or a clear error for models LoRA Lab does not train."""
    lineage = comfy.model_class_lineage(model)
    unet_config = comfy.model_config(model).unet_config
    for name, conversion in CONVERSIONS.items():
        found = lineage[0] == conversion.model_class if conversion.exact else conversion.model_class in lineage
        if found and conversion.accepts(unet_config):
            return get_family(name)
    titles = ", ".join(get_family(name).title + (f" (ComfyUI {conversion.needs} or later)" if conversion.needs else "")
                       for name, conversion in reversed(CONVERSIONS.items()))
    raise LoraLabError(f"Train LoRA trains {titles} models; this graph's model is {lineage[0]} (ComfyUI "
                       f"{comfy.comfy_version()}). Load one of those.")


class GraphEncoders(Encoders):
    """Captions through the graph's CLIP and images through its VAE, shaped as the family wants.
    When the text encoder trains, captions go through `stage`, a copy of the CLIP's modules over
    its own tensors that holds the adapter layers (comfy_bridge.trainable_text_stage), by ComfyUI's
    own encoding steps: at strength 0 it encodes exactly as the graph's CLIP does."""

    def __init__(self, family: ModelFamily, clip: Any, vae: Any, latent_format: Any,
                 stage: torch.nn.Module | None = None, text_encoders: list[torch.nn.Module] | None = None) -> None:
        super().__init__(text_encoders)
        self.family, self.clip, self.vae, self.latent_format, self.stage = family, clip, vae, latent_format, stage

    def modules(self) -> list[torch.nn.Module]:
        return [self.stage] if self.stage is not None else []  # ComfyUI's CLIP counts only when it trains

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = [comfy.encode_pooled(self.clip, caption, self.stage) for caption in captions]
        rows = self.family.text_rows([cond for cond, _ in encoded])
        conditioning = {key: value.clone() for key, value in rows.items()}
        if self.family.pooled_conditioning:
            conditioning[self.family.pooled_conditioning] = torch.cat([pooled for _, pooled in encoded]).clone()
        return conditioning

    def pixels_per_latent(self) -> int:
        return getattr(self.latent_format, "spacial_downscale_ratio", 8)  # FLUX.2's latents are 16 px a side

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(((pixels + 1) / 2).clamp(0, 1).movedim(1, -1))
        return self.latent_format.process_in(raw).clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.latent_format.process_out(latents))  # (B, H, W, C) in [0, 1]
        return images.movedim(-1, 1).float() * 2 - 1


def text_stage_of(loaded: LoadedModel) -> torch.nn.Module | None:
    """The copy of the CLIP's modules a run trains the text encoder in (None when it does not)."""
    return loaded.encoders.stage if isinstance(loaded.encoders, GraphEncoders) else None


def weights_key(denoiser: torch.nn.Module, extra: str = "") -> str:
    """A digest that changes whenever the weights do: every tensor's name and shape, and a strided
    sample of its values (hashing every byte of a 12B-parameter model would take minutes)."""
    digest = hashlib.sha256(extra.encode())
    with torch.no_grad():
        for name, tensor in denoiser.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu")
            raw = sample.view(torch.uint8) if sample.dtype == FLOAT8 else sample.float()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def shared_denoiser(model: Any) -> torch.nn.Module:
    """A diffusers denoiser whose weights are the graph MODEL's tensors as they are now."""
    return CONVERSIONS[family_of(model).name].denoiser(model)


def model_identity(model: Any, model_name: str) -> ModelIdentity:
    """Which base model a graph's MODEL is: its file's name, and a digest of its weights as ComfyUI
    loads them for this graph (loaded whole first, so patches applied upstream, such as a LoRA,
    are in the weights) and of what it predicts. The same file and patches give the same key after
    a server restart: how Train LoRA recognises a run it finished (nodes/run_plan.py)."""
    comfy.free_memory_for_training(model)
    key = weights_key(comfy.diffusion_model(model), comfy.prediction_type(model))
    return ModelIdentity(name=model_name, key=key)


def loaded_model(model: Any, clip: Any, vae: Any, identity: ModelIdentity,
                 text_encoder: bool = False) -> LoadedModel:
    """The trainer's view of a graph's MODEL, CLIP and VAE (see the module docstring); with
    `text_encoder`, the CLIP's text encoders are the model's too, for text-encoder LoRA (families
    whose conversion names none train their denoiser only, and the run's settings say so)."""
    family = family_of(model)
    names = CONVERSIONS[family.name].text_encoders if text_encoder else ()
    comfy.free_memory_for_training(model, clip if names else None)
    stage = comfy.trainable_text_stage(clip) if names else None
    text_encoders = [getattr(stage, name).transformer for name in names]
    return LoadedModel(family=family, denoiser=shared_denoiser(model),
                       encoders=GraphEncoders(family, clip, vae, comfy.latent_format(model), stage, text_encoders),
                       noise_scheduler=family.training_scheduler(), prediction_type=comfy.prediction_type(model),
                       identity=identity, resolution=family.default_resolution,
                       original_names=CONVERSIONS[family.name].original_names(model))


def lora_for(model: Any, path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors for a graph's MODEL; one whose layers are all another family's (a FLUX
    LoRA given to a Z-Image model) is refused naming both, before ComfyUI drops its every key."""
    tensors = comfy.load_lora_file(path)
    try:
        family = family_of(model)
    except (LoraLabError, AttributeError):  # a model LoRA Lab does not train, or another pack's wrapper of
        return tensors  # a MODEL: ComfyUI's loader says what it drops
    _, layers, _ = layer_keys(check_lora(path))
    other = other_family(sorted(layers), family)
    if other is not None:
        raise LoraLabError(f"{path.name} is a {other.title} LoRA (its layers are {other.title}'s, e.g. "
                           f"{sorted(layers)[0]}), and this model is {family.title}: none of its layers would load. "
                           f"Pick a {family.title} LoRA, or load the {other.title} model it was trained for.")
    return tensors


LOADER_INPUTS = ("ckpt_name", "unet_name", "model_name")  # the file widgets of ComfyUI's model loaders


def model_file_name(prompt: dict | None, node_id: str | None, input_name: str = "model") -> str:
    """The model file a node's MODEL input comes from, found by walking the queued prompt up its
    model links (through LoRA loaders and other patches) to the loader; for metadata."""
    seen: set[str] = set()
    node = (prompt or {}).get(str(node_id))
    link = node["inputs"].get(input_name) if node else None
    while isinstance(link, list) and link and str(link[0]) not in seen:
        seen.add(str(link[0]))
        node = prompt.get(str(link[0]), {})
        inputs = node.get("inputs", {})
        for name in LOADER_INPUTS:
            if isinstance(inputs.get(name), str):
                return inputs[name]
        link = inputs.get("model")
    return "unknown (ComfyUI graph)"
