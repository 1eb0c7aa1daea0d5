"""Random-weight models of every family, built from configs as diffusers folders (no downloads):
"tiny" for the test suite, "reduced" (wider, more blocks) for benchmarks. They share the embedded
model's own small CLIP tokenizer; FLUX's T5 slot reuses it too (any tokenizer with the same call
works there, and T5's relative positions take any length). The Qwen3-conditioned families get a
byte-level BPE tokenizer built here with Qwen3's special tokens and chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from lora_lab.trainer import embedded
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SIZES = {"tiny": 1, "reduced": 4}  # width multiplier


def _tokenizer(pad: str | None = None) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(embedded.TINY_MODEL / "tokenizer")
    if pad is not None:  # SDXL's second tokenizer pads with "!" (OpenCLIP's convention)
        tokenizer.pad_token = pad
    return tokenizer


def _clip(hidden: int, projection: bool, vocab: int) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_channels: int, width: int, shift: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8,
                         scaling_factor=0.5, shift_factor=shift)


def build_sdxl(folder: Path, size: str = "tiny") -> Path:
    k = SIZES[size]
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    te1, te2 = _clip(16 * k, False, vocab), _clip(24 * k, True, vocab)  # unequal widths, as in SDXL
    unet = UNet2DConditionModel(
        block_out_channels=(32 * k, 64 * k), layers_per_block=1, down_block_types=("DownBlock2D",
                                                                                   "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
        cross_attention_dim=40 * k, transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 24 * k,
        sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(4, 8 * k), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=_tokenizer(pad="!"), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def build_flux(folder: Path, size: str = "tiny") -> Path:
    k = SIZES[size]
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32 * k, d_ff=64 * k, d_kv=16, num_heads=2 * k,
                                 num_layers=1 + (k > 1), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 use_cache=False))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1 * k, num_single_layers=1 * k,
                                         attention_head_dim=16, num_attention_heads=2 * k,
                                         joint_attention_dim=32 * k, pooled_projection_dim=16 * k,
                                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(16, 8 * k, shift=0.1), text_encoder=_clip(16 * k, False, vocab),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


# Qwen3's chat template, reduced to what the pipelines use: user turns, the assistant's turn opened,
# and the empty thinking block that enable_thinking=False adds.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def _qwen_tokenizer() -> Qwen2Tokenizer:
    vocab = {symbol: i for i, symbol in enumerate(sorted(set(bytes_to_unicode().values()), key=ord))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġ", "a")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen3(hidden: int, layers: int, vocab: int) -> Qwen3Model:
    return Qwen3Model(Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=hidden // 2, max_position_embeddings=1024))


def build_zimage(folder: Path, size: str = "tiny") -> Path:
    k = SIZES[size]
    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32 * k, n_layers=2 * k, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=16 * k, axes_dims=[8 * k, 4 * k, 4 * k],
                                           axes_lens=[1024, 64, 64])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=_vae(16, 8 * k, shift=0.1159), tokenizer=tokenizer,
                          text_encoder=_qwen3(16 * k, 2, len(tokenizer)), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def build_flux2(folder: Path, size: str = "tiny") -> Path:
    k = SIZES[size]
    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    hidden = 16 * k
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2, max_position_embeddings=1024))
    vae = AutoencoderKLFlux2(block_out_channels=(8 * k, 16 * k, 16 * k, 16 * k), latent_channels=4, layers_per_block=1,
                             norm_num_groups=8)
    vae.bn.running_mean.copy_(torch.randn(16) * 0.1)  # statistics of its own, so normalising them is tested
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    transformer = Flux2Transformer2DModel(in_channels=16, num_layers=k, num_single_layers=k, attention_head_dim=16,
                                          num_attention_heads=2 * k, joint_attention_dim=3 * hidden,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {"sdxl": build_sdxl, "flux": build_flux, "zimage": build_zimage, "flux2": build_flux2}


def build(family: str, folder: Path, size: str = "tiny") -> Path:
    """A diffusers folder of a random `family` model (the shipped tiny model for sd15 at tiny size)."""
    if family == "sd15" and size == "tiny":
        return embedded.TINY_MODEL
    if family == "sd15":
        return _build_sd15(folder, size)
    return BUILDERS[family](folder, size)


def _build_sd15(folder: Path, size: str) -> Path:
    from diffusers import StableDiffusionPipeline

    k = SIZES[size]
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(32 * k, 64 * k), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                                norm_num_groups=8, cross_attention_dim=16 * k, sample_size=32)
    pipe = StableDiffusionPipeline(vae=_vae(4, 8 * k), text_encoder=_clip(16 * k, False, len(tokenizer)),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_blip(folder: Path) -> Path:
    """A randomly initialised BLIP captioning model with a 15-word vocabulary, saved as a user's
    model folder would be (config, weights, processor): it proves the captioner path end to end,
    not the quality of its captions."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "circle", "on", "white",
             "background", "photo", "of", "woman"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(text_config={**small, "vocab_size": len(words), "encoder_hidden_size": 32, "bos_token_id": 5,
                                     "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3,
                                     "max_position_embeddings": 64},
                        vision_config={**small, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
