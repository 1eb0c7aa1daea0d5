"""Z-Image (Tongyi-MAI Z-Image and Z-Image-Turbo): ZImageTransformer2DModel, a 6B single-stream DiT
+ FLUX.1's 16-channel AutoencoderKL + Qwen3-4B as the text encoder; flow matching.

How the family's own code drives it (diffusers' ZImagePipeline, Tongyi-MAI/Z-Image's pipeline.py,
ComfyUI's comfy/text_encoders/z_image.py and comfy/ldm/lumina/model.py agree):
- a caption goes through Qwen3's chat template (a user turn, then the assistant's turn opened, no
  thinking block) and the second-to-last hidden layer is the conditioning, padding dropped: each
  caption's sequence has its own length (at most 512 tokens, template included). Rows here are
  padded to 512 with a mask, so a batch stacks; the mask drops the padding again before the
  transformer, which pads each caption to a multiple of 32 itself.
- the transformer takes 1 - σ and predicts x0 - noise (the pipeline negates it), so `predict`
  returns the negation: the flow velocity noise - x0 every flow family here trains on.
- no guidance embedding: samples use classifier-free guidance (Z-Image-Turbo is distilled to
  guidance 1 and 8 steps; the base model samples with CFG about 4-5 and 30-50 steps).

Training defaults and where they come from:
- resolution 1024 (Tongyi-MAI/Z-Image src/config/inference.py: 1024x1024; ai-toolkit and
  musubi-tuner bucket around it).
- timestep shift 3.0, fixed (the model's scheduler: Tongyi-MAI/Z-Image src/config/model.py,
  DEFAULT_SCHEDULER_SHIFT = 3.0 without dynamic shifting; ComfyUI's ZImage sampling shift 3.0),
  drawn as every flow family here draws it (objectives.py); musubi-tuner suggests 2.0-3.0.
- LoRA on the 30 main blocks' attention (and with attention_mlp their SwiGLU feed-forward), not
  the refiner blocks or the modulation: musubi-tuner's networks/lora_zimage.py excludes
  `_modulation` and `_refiner`; ai-toolkit trains the `layers` only.
- captions in natural language (the model card and diffusers' README: long, detailed prompts).

LoRA files use diffusers names under `diffusion_model.` with an `.alpha` per layer, as ai-toolkit
writes them: ComfyUI's LoraLoader maps them onto its fused q/k/v (comfy/lora.py, z_image_to_diffusers,
ComfyUI 0.3.76 and later), and diffusers' ZImageLoraLoaderMixin reads them with their alphas (under
`transformer.` it would read the alphas but keep the prefix twice, and load nothing: diffusers 0.42).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

from ..errors import LoraLabError
from .base import FamilyEncoders, LoadedModel
from .dit import TransformerFamily, count_blocks

ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TEXT_TOKENS = 512  # the pipelines' max_sequence_length, chat template included
# The diffusers names ComfyUI maps (z_image_to_diffusers: every block's attention, feed-forward
# and modulation, the embedders and the final layer).
LAYERS = (r"diffusion_model\.((layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)"
          r"|feed_forward\.w[123]|adaLN_modulation\.0)|all_x_embedder\.2-1|cap_embedder\.1|t_embedder\.mlp\.[02]"
          r"|all_final_layer\.2-1\.(linear|adaLN_modulation\.1))")


class ZImageFamily(TransformerFamily):
    name = "zimage"
    title = "Z-Image"
    default_resolution = 1024
    base_model_version = "zimage"
    architecture = "z-image/lora"
    pipeline_classes = ("ZImagePipeline",)
    pipeline_class = ZImagePipeline
    text_tokens = TEXT_TOKENS
    # As ComfyUI's own Z-Image templates load it (Comfy-Org/z_image_turbo split_files).
    comfy_text_encoders = ("qwen_3_4b.safetensors",)
    comfy_clip_type = "lumina2"
    comfy_vae = "ae.safetensors"
    unsupported_settings = (*TransformerFamily.unsupported_settings, "train_guidance")
    unsupported_reason = ("Z-Image trains with flow matching, has no guidance input, and its LoRA trains the "
                          "transformer only")
    target_sets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP}
    excluded_modules = r".*(noise_refiner|context_refiner)\..*"
    fp8_kept = r"t_embedder\..*"  # its input is cast to its first weight's dtype, which must not be fp8
    layer_patterns = (LAYERS,)
    denoiser_prefix = "diffusion_model"

    def recognises(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return any(key.endswith(("noise_refiner.0.attention.qkv.weight", "noise_refiner.0.attention.to_q.weight"))
                   for key in shapes) and any(key.endswith("cap_embedder.1.weight") for key in shapes)

    def training_scheduler(self) -> Any:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)

    # --- loading ---------------------------------------------------------------------------
    def pipeline_class_transformer(self) -> Any:
        return ZImageTransformer2DModel

    def to_diffusers_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(key.endswith("attention.qkv.weight") for key in state):  # Tongyi's and ComfyUI's layout
            from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

            state = convert_z_image_transformer_checkpoint_to_diffusers(state)
        return state

    def config_from_state(self, state: dict[str, torch.Tensor], config: dict[str, Any],
                          file_name: str) -> dict[str, Any]:
        if "cap_embedder.1.weight" not in state or "layers.0.attention.norm_q.weight" not in state:
            raise LoraLabError(f"{file_name} has no caption embedder or no blocks; is it a complete Z-Image "
                               "transformer file?")
        dim, caption_width = state["cap_embedder.1.weight"].shape
        heads = dim // state["layers.0.attention.norm_q.weight"].shape[0]
        return {**config, "dim": dim, "cap_feat_dim": caption_width, "n_heads": heads, "n_kv_heads": heads,
                "n_layers": count_blocks(state, "layers"), "n_refiner_layers": count_blocks(state, "noise_refiner")}

    # --- encoding and prediction ------------------------------------------------------------
    def encode_prompts(self, encoders: FamilyEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        (tokenizer,), (encoder,) = encoders.tokenizers, encoders.text_encoders
        texts = [chat_prompt(tokenizer, caption, thinking=True) for caption in captions]
        tokens = tokenizer(texts, padding="max_length", max_length=self.text_tokens, truncation=True,
                           return_tensors="pt").to(encoders.device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.bool(),
                         output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden, "prompt_mask": tokens.attention_mask.to(hidden.dtype)}

    def text_rows(self, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return masked_rows(sequences, self.text_tokens)

    def measured_text(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The caption's own length (the transformer pads it to a multiple of 32), not the padded rows'.
        length = min(self.text_tokens, -(-int(conditioning["prompt_mask"].sum(1).max()) // 32) * 32)
        return {key: value[:, :length] for key, value in conditioning.items()}

    def predict(self, model: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        captions = unpadded_rows(conditioning["prompt_embeds"], conditioning["prompt_mask"])
        images = list(noisy.unsqueeze(2).unbind(0))  # (C, frames = 1, H, W) each
        output = model.denoiser(images, (1 - timesteps).to(noisy.dtype), captions, return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def pipeline(self, model: LoadedModel) -> Any:
        encoders = self.own_encoders(model)
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
                              vae=encoders.vae, text_encoder=encoders.text_encoders[0],
                              tokenizer=encoders.tokenizers[0], transformer=model.denoiser)


def chat_prompt(tokenizer: Any, caption: str, thinking: bool) -> str:
    """A caption as the Qwen3 chat turn the Qwen3-conditioned families encode."""
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def unpadded_rows(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `masked_rows`: each row without its padding. On the meta device (the memory
    estimate, budget.py) the mask's values are unknown, so every row keeps the length it is given:
    `measured_text` cut it to the measured caption's own."""
    if embeds.device.type == "meta":
        return list(embeds.unbind(0))
    return [row[keep > 0.5] for row, keep in zip(embeds, mask, strict=True)]


def masked_rows(sequences: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """(1, L, D) sequences of different lengths as rows padded to `length`, with their mask."""
    width = sequences[0].shape[-1]
    embeds = sequences[0].new_zeros(len(sequences), length, width)
    mask = sequences[0].new_zeros(len(sequences), length)
    for row, sequence in enumerate(sequences):
        count = min(sequence.shape[1], length)
        embeds[row, :count], mask[row, :count] = sequence[0, :count], 1
    return {"prompt_embeds": embeds, "prompt_mask": mask}
