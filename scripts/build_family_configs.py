"""Write the configs that let single-file checkpoints load offline (diffusers' `from_single_file`
needs a local `config=` folder or it goes to the hub), into trainer/families/configs/<family>/
(SD 1.5 and SDXL: every component; FLUX, Z-Image and FLUX.2: the transformer, VAE and scheduler).

The configs are the published architecture values of each base model. The CLIP tokenizer files
are derived from the CLIP BPE merges file that the `open-clip-torch` wheel carries:

    pip download --no-deps -d /tmp/oc open-clip-torch
    python scripts/build_family_configs.py --open-clip-wheel /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_embedded_model import byte_symbols  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "families" / "configs"
CLIP_MERGE_COUNT = 49152 - 256 - 2  # the CLIP vocabulary is 49408 = 2 × 256 bytes + merges + 2 specials

SD15 = {
    "model_index.json": {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_act": "quick_gelu", "hidden_size": 768,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
        "vocab_size": 49408, "torch_dtype": "float32",
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon", "trained_betas": None,
    },
}

CLIP_L = SD15["text_encoder/config.json"]
SDXL = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    },
    "vae/config.json": {**SD15["vae/config.json"], "sample_size": 1024, "scaling_factor": 0.13025,
                        "force_upcast": True},
    "text_encoder/config.json": CLIP_L,
    "text_encoder_2/config.json": {
        **CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
        "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    },
}
FLUX = {
    "transformer/config.json": {
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
        "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
    },
    "vae/config.json": {
        **SD15["vae/config.json"], "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
        "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True,
    },
}
# Z-Image-Turbo's published transformer (Tongyi-MAI/Z-Image src/config/model.py and the diffusers
# folder's transformer/config.json), the FLUX.1 VAE it uses, and its fixed-shift scheduler.
ZIMAGE = {
    "transformer/config.json": {
        "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16,
        "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-05,
        "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    "vae/config.json": FLUX["vae/config.json"],
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": False,
    },
}
# FLUX.2 [klein] 4B's published transformer (diffusers' scripts/convert_flux2_to_diffusers.py:
# 5 double and 20 single blocks, 3072 wide, Qwen3-4B's three layers as text), FLUX.2's VAE and its
# scheduler (dynamic shift, FLUX.1-dev's base and max).
FLUX2 = {
    "transformer/config.json": {
        "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "num_layers": 5,
        "num_single_layers": 20, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
        "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
        "eps": 1e-06, "guidance_embeds": False,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKLFlux2", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "latent_channels": 32,
        "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True, "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1, "patch_size": [2, 2],
    },
    "scheduler/scheduler_config.json": FLUX["scheduler/scheduler_config.json"],
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    "do_lower_case": True, "clean_up_tokenization_spaces": True,
}


def write_clip_tokenizer(wheel: Path, folder: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.decompress(archive.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = lines[1:CLIP_MERGE_COUNT + 1]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-clip-wheel", type=Path, required=True)
    args = parser.parse_args()
    for name, files in {"sd15": SD15, "sdxl": SDXL, "flux": FLUX, "zimage": ZIMAGE,
                                                         "flux2": FLUX2}.items():
        for relative, content in files.items():
            path = CONFIGS / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
    # One copy of the CLIP tokenizer serves every family (SDXL's second one differs only in padding).
    write_clip_tokenizer(args.open_clip_wheel, CONFIGS / "sd15" / "tokenizer")


if __name__ == "__main__":
    main()
