"""Loading base models: family detection, and clear errors for the wrong or a broken file."""

from __future__ import annotations

import pytest
import torch
from lora_lab.trainer.config import build_config
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.families import detect_family, get_family
from lora_lab.trainer.run import load_base_model
from safetensors.torch import save_file

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def test_detect_family_from_tensor_names():
    assert detect_family({SD15_KEY: (320, 768)}) == "sd15"
    assert detect_family({"conditioner.embedders.1.model.ln_final.weight": (1280,)}) == "sdxl"
    assert detect_family({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}) == "flux"
    with pytest.raises(LoraLabError, match="Stable Diffusion 2.x"):
        detect_family({SD15_KEY: (320, 1024)})
    with pytest.raises(LoraLabError, match="Could not recognise.*first tensors: foo"):
        detect_family({"foo": (1,)})


def test_family_is_detected_from_folders_and_files(tmp_path):
    from lora_lab.trainer import embedded
    from lora_lab.trainer.families import detect_source_family

    assert detect_source_family(embedded.TINY_MODEL) == "sd15"
    for name, key in (("xl", "conditioner.embedders.1.model.ln_final.weight"), ("bfl", "double_blocks.0.img_attn.qkv"
                      ".weight"), ("diffusers_flux", "transformer_blocks.0.attn.add_q_proj.weight")):
        save_file({key: torch.zeros(2)}, str(tmp_path / f"{name}.safetensors"))
    assert detect_source_family(tmp_path / "xl.safetensors") == "sdxl"
    assert detect_source_family(tmp_path / "bfl.safetensors") == "flux"
    assert detect_source_family(tmp_path / "diffusers_flux.safetensors") == "flux"
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(LoraLabError, match="holds a StableDiffusion3Pipeline model; LoRA Lab trains SD 1.5, SDXL"):
        detect_source_family(tmp_path / "sd3")


def test_wrong_family_file_is_named(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(path))
    with pytest.raises(LoraLabError, match="looks like a sdxl model, not sd15; set family to sdxl"):
        load_base_model(build_config({"family": "sd15", "base_model": str(path)}), torch.device("cpu"))


def test_truncated_and_pickle_files_are_refused(tmp_path):
    good = tmp_path / "model.safetensors"
    save_file({SD15_KEY: torch.zeros(320, 768)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(LoraLabError, match="not a readable .safetensors file.*download it again"):
        load_base_model(build_config({"base_model": str(cut)}), torch.device("cpu"))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not opened")
    with pytest.raises(LoraLabError, match="pickle-based checkpoint.*never opened"):
        load_base_model(build_config({"base_model": str(pickle)}), torch.device("cpu"))


def test_missing_model_and_non_model_folder(tmp_path):
    with pytest.raises(LoraLabError, match="does not exist"):
        load_base_model(build_config({"base_model": str(tmp_path / "nope.safetensors")}), torch.device("cpu"))
    with pytest.raises(LoraLabError, match="not a diffusers model folder"):
        load_base_model(build_config({"base_model": str(tmp_path)}), torch.device("cpu"))


def test_embedded_model_loads_offline(base_model):
    assert base_model.family is get_family("sd15")
    assert base_model.prediction_type == "epsilon"
    assert base_model.family.pixel_multiple(base_model) == 8
    assert sum(p.numel() for p in base_model.denoiser.parameters()) < 5_000_000


def test_unknown_targets_are_explained(fresh_model):
    from lora_lab.trainer.lora import add_lora

    with pytest.raises(LoraLabError, match="matched no layer.*attention"):
        add_lora(fresh_model, 4, 4.0, "no_such_layer", train_text_encoder=False)


def test_single_file_checkpoint_loads_offline_and_matches_the_folder(tmp_path, base_model):
    from lora_lab.trainer import embedded

    from .ldm_layout import write_ldm_checkpoint

    path = tmp_path / "tiny.safetensors"
    write_ldm_checkpoint(base_model.denoiser, base_model.encoders.vae, base_model.text_encoders[0], path)
    config = build_config({"base_model": str(path), "model_config": str(embedded.TINY_MODEL)})
    loaded = load_base_model(config, torch.device("cpu"))
    for ours, theirs in [(loaded.denoiser, base_model.denoiser), (loaded.encoders.vae, base_model.encoders.vae),
                         (loaded.text_encoders[0], base_model.text_encoders[0])]:
        expected = theirs.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())


def test_sdxl_single_file_checkpoint_loads_offline_and_matches_the_folder(tmp_path):
    from .ldm_layout import write_ldm_checkpoint
    from .tiny_models import build_sdxl

    folder = build_sdxl(tmp_path / "tiny-sdxl")
    reference = load_base_model(build_config({"family": "sdxl", "base_model": str(folder)}), torch.device("cpu"))
    path = tmp_path / "tiny-sdxl.safetensors"
    write_ldm_checkpoint(reference.denoiser, reference.encoders.vae, reference.text_encoders[0], path,
                         text_encoder_2=reference.text_encoders[1])
    with pytest.raises(LoraLabError, match="looks like a sdxl model, not sd15; set family to sdxl"):
        load_base_model(build_config({"family": "sd15", "base_model": str(path), "model_config": str(folder)}),
                        torch.device("cpu"))
    config = build_config({"base_model": str(path), "model_config": str(folder)})  # family auto: sdxl
    loaded = load_base_model(config, torch.device("cpu"))
    pairs = [(loaded.denoiser, reference.denoiser), (loaded.encoders.vae, reference.encoders.vae),
             *zip(loaded.text_encoders, reference.text_encoders, strict=True)]
    for ours, theirs in pairs:
        expected = theirs.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())


def test_shipped_sdxl_config_gets_the_shipped_tokenizers():
    from lora_lab.trainer.families.sd15 import CONFIGS

    tokenizers = get_family("sdxl")._tokenizers(CONFIGS / "sdxl")
    assert set(tokenizers) == {"tokenizer", "tokenizer_2"}
    assert tokenizers["tokenizer"].pad_token == "<|endoftext|>" and tokenizers["tokenizer_2"].pad_token == "!"
    assert tokenizers["tokenizer_2"].convert_tokens_to_ids("!") == 0  # OpenCLIP pads with token 0


def test_shipped_sd15_configs_and_clip_tokenizer():
    from diffusers import UNet2DConditionModel
    from lora_lab.trainer.families.sd15 import CONFIGS
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / "sd15" / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    unet_config = UNet2DConditionModel.load_config(CONFIGS / "sd15" / "unet")
    assert unet_config["cross_attention_dim"] == 768 and unet_config["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.parametrize("layout", ["original", "original with prefix", "diffusers"])
def test_flux_transformer_file_loads_with_its_parts_folder(tmp_path, layout):
    from lora_lab.trainer.families.flux_layout import to_diffusers, to_original
    from safetensors.torch import load_file

    from .tiny_models import build_flux

    folder = build_flux(tmp_path / "tiny-flux")
    reference = load_base_model(build_config({"base_model": str(folder)}), torch.device("cpu"))
    assert reference.family.name == "flux"
    state = reference.denoiser.state_dict()
    config = reference.denoiser.config
    if layout != "diffusers":
        state = to_original(state, config.num_layers, config.num_single_layers,
                            config.num_attention_heads * config.attention_head_dim)
        assert to_diffusers(state).keys() == reference.denoiser.state_dict().keys()
    if layout == "original with prefix":  # as in full checkpoints
        state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(LoraLabError, match="holds only the FLUX.1-dev transformer. Set model_config"):
        load_base_model(build_config({"base_model": str(path)}), torch.device("cpu"))
    loaded = load_base_model(build_config({"base_model": str(path), "model_config": str(folder)}), torch.device("cpu"))
    expected = reference.denoiser.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.denoiser.state_dict().items())
    assert loaded.denoiser.config.guidance_embeds and load_file(str(path))


# family -> (its fused key in the original layout, the unfused one diffusers has instead, the
# config's block counts, the file's name)
ORIGINAL_LAYOUTS = {
    "zimage": ("layers.0.attention.qkv.weight", "layers.0.attention.to_q.weight", ("n_layers",),
               "z_image_tiny.safetensors"),
    "flux2": ("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight",
              ("num_layers", "num_single_layers"), "flux-2-klein-tiny.safetensors"),
}


@pytest.mark.parametrize("family", sorted(ORIGINAL_LAYOUTS))
@pytest.mark.parametrize("layout", ["original", "original with prefix", "diffusers"])
def test_qwen3_family_transformer_file_loads_with_its_parts_folder(tmp_path, family, layout):
    import re

    from . import ldm_layout
    from .tiny_models import build

    fused, unfused, counts, name = ORIGINAL_LAYOUTS[family]
    folder = build(family, tmp_path / f"tiny-{family}")
    reference = load_base_model(build_config({"base_model": str(folder)}), torch.device("cpu"))
    assert reference.family.name == family
    state = reference.denoiser.state_dict()
    if layout != "diffusers":
        state = getattr(ldm_layout, f"{family}_original_layout")(state)
        assert fused in state and unfused not in state and len(state) < len(reference.denoiser.state_dict())
    if layout == "original with prefix":  # as in full checkpoints
        state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert detect_family({key: tuple(value.shape) for key, value in state.items()}) == family
    with pytest.raises(LoraLabError, match=f"holds only the {re.escape(reference.family.title)} transformer. Set "
                                           "model_config"):
        load_base_model(build_config({"base_model": str(path)}), torch.device("cpu"))
    loaded = load_base_model(build_config({"base_model": str(path), "model_config": str(folder)}), torch.device("cpu"))
    expected = reference.denoiser.state_dict()
    assert loaded.denoiser.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.denoiser.state_dict().items())
    assert all(loaded.denoiser.config[count] == reference.denoiser.config[count] for count in counts)


def test_a_zimage_folder_is_not_read_as_another_family(tmp_path):
    from .tiny_models import build_zimage

    folder = build_zimage(tmp_path / "tiny-zimage")
    with pytest.raises(LoraLabError, match="not FLUX.1-dev"):
        load_base_model(build_config({"base_model": str(folder), "family": "flux"}), torch.device("cpu"))


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_qwen3_families_encode_as_their_own_pipelines_do(tmp_path, family):
    """Captions and images become exactly what diffusers' ZImagePipeline / Flux2KleinPipeline feed
    their transformers (chat template, hidden layers, padding; FLUX.2's folded, normalised latents)."""
    from .tiny_models import build

    model = load_base_model(build_config({"base_model": str(build(family, tmp_path / family)),
                                          "mixed_precision": "no"}), torch.device("cpu"))
    pipe = model.family.pipeline(model)
    captions = ["zkw_toy, a ring on a table", "a gray square"]
    ours = model.encoders.encode_prompts(captions)
    with torch.no_grad():
        if family == "zimage":
            theirs, _ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False)
            mine = [row[mask > 0.5] for row, mask in zip(ours["prompt_embeds"], ours["prompt_mask"], strict=True)]
            assert [t.shape for t in theirs] == [m.shape for m in mine]
            assert all(torch.equal(t, m) for t, m in zip(theirs, mine, strict=True))
        else:
            depth = model.text_encoders[0].config.num_hidden_layers
            theirs, _ = pipe.encode_prompt(prompt=captions, text_encoder_out_layers=(depth // 4, depth // 2,
                                                                                      3 * depth // 4))
            assert torch.equal(theirs, ours["prompt_embeds"])
            pixels = torch.rand(1, 3, 64, 64) * 2 - 1
            vae = model.encoders.vae
            folded = pipe._patchify_latents(vae.encode(pixels).latent_dist.mode())
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            expected = (folded - vae.bn.running_mean.view(1, -1, 1, 1)) / std
            torch.testing.assert_close(model.encoders.encode_images(pixels), expected, atol=0, rtol=0)
