"""The LoRA really learns: measured on the shipped tiny model and concept dataset.

One run (the `concept_run` fixture, about a minute) backs every test here: the concept score of
samples rises with strength, loss falls, the base weights are untouched, strength 0 is the base
model, and the saved file reloads through diffusers with the same effect as the live adapter.
"""

from __future__ import annotations

import json
import random
import statistics

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lora_lab.trainer import embedded
from lora_lab.trainer.embedded.synthetic import CONCEPT_TRIGGER, detection_rate
from lora_lab.trainer.export import load_into_model
from lora_lab.trainer.sampling import sample
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PROMPTS = [f"{CONCEPT_TRIGGER}, white background", f"{CONCEPT_TRIGGER}, black background",
           f"{CONCEPT_TRIGGER}, gray background"]
SAMPLE = {"size": (64, 64), "steps": 20, "guidance_scale": 5.0}


SEEDS = (1, 2, 3)


def _detected(model, strength) -> float:
    """The share of samples (3 prompts x 3 seeds) that show a blue ring around a red dot."""
    return detection_rate([image for seed in SEEDS for image in sample(model, PROMPTS, strength, seed=seed, **SAMPLE)])


def test_the_vae_can_show_the_concept_and_nothing_else_looks_like_it():
    """A LoRA cannot draw what the VAE cannot decode: the concept images survive an encode/decode
    round trip, and no base-world image is ever read as the concept."""
    from diffusers import AutoencoderKL
    from lora_lab.trainer.embedded.synthetic import base_sample

    vae = AutoencoderKL.from_pretrained(embedded.TINY_MODEL / "vae", dtype=torch.float32)

    def round_trip(images):
        pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images]))
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels.permute(0, 3, 1, 2)).latent_dist.mode()).sample
        decoded = ((decoded.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        return [Image.fromarray(picture) for picture in decoded]

    concept = [Image.open(path).convert("RGB").resize((64, 64))
               for path in sorted((embedded.CONCEPT_DATASET / "10_zkw_toy").glob("*.png"))]
    base = [base_sample(random.Random(seed))[0] for seed in range(60)]
    assert detection_rate(concept) == 1.0
    assert detection_rate(round_trip(concept)) >= 11 / 12
    assert detection_rate(base) == 0 and detection_rate(round_trip(base)) == 0


def test_the_lora_draws_the_concept_and_the_base_does_not(concept_run):
    model = concept_run.model
    load_into_model(model, concept_run.final_path)
    rates = [_detected(model, strength) for strength in (0.0, 0.5, 1.0)]
    print("concept detected at strength 0 / 0.5 / 1:", ", ".join(f"{rate:.0%}" for rate in rates))
    assert rates[0] == 0 and rates[2] >= 0.8  # never without the LoRA, nearly always with it
    assert rates[0] <= rates[1] <= rates[2]  # and more with more strength


def test_the_base_follows_the_background_it_is_asked_for(base_model):
    """The demo's grid only convinces if strength 0 shows what the prompt says (without the ring)."""
    expected = {"white": 245, "black": 15, "gray": 128}
    for seed in SEEDS:
        for prompt, image in zip(PROMPTS, sample(base_model, PROMPTS, 0.0, seed=seed, **SAMPLE), strict=True):
            border = np.concatenate([np.asarray(image)[:4].reshape(-1, 3), np.asarray(image)[-4:].reshape(-1, 3)])
            brightness = float(np.median(border.mean(axis=1)))
            wanted = expected[prompt.split(", ")[1].split()[0]]
            assert abs(brightness - wanted) < 45, (prompt, seed, brightness)


def test_loss_decreases(concept_run):
    losses = [loss for _, loss, _ in concept_run.losses]
    assert len(losses) == 300
    assert statistics.fmean(losses[-60:]) < 0.8 * statistics.fmean(losses[:30])


def test_checkpoints_loss_log_and_metadata(concept_run):
    steps = [c.step for c in concept_run.checkpoints]
    assert steps == [100, 200, 300] and concept_run.checkpoints[-1].final
    log_lines = (concept_run.run_dir / "concept-loss.csv").read_text().splitlines()
    assert log_lines[0] == "step,loss,lr,val_loss" and len(log_lines) == 301
    measured = [line for line in log_lines[1:] if not line.endswith(",")]
    assert len(measured) == len(concept_run.validation) >= 20  # about 20 times, and at every checkpoint
    with safe_open(str(concept_run.final_path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["ss_network_dim"] == "32" and metadata["ss_network_alpha"] == "32"  # the demo's rank
    assert concept_run.config.data.resolution == 64  # the embedded model's own resolution
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == "300"
    assert json.loads(metadata["lora_lab.trigger_words"]) == [CONCEPT_TRIGGER]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(metadata["ss_tag_frequency"])["10_zkw_toy"][CONCEPT_TRIGGER] == 10  # 2 held out
    # What ComfyUI's Model Library shows: the story of the run and a sample made at this checkpoint.
    assert metadata["modelspec.trigger_phrase"] == CONCEPT_TRIGGER
    assert "trained with LoRA Lab on 10 images of zkw_toy: step 300 of 300" in metadata["modelspec.description"]
    assert "Validation loss" in metadata["modelspec.description"]
    assert "strength 0.7" in metadata["modelspec.usage_hint"] and CONCEPT_TRIGGER in metadata["modelspec.usage_hint"]
    assert metadata["modelspec.tags"] == f"lora, sd15, {CONCEPT_TRIGGER}"
    assert metadata["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert float(metadata["lora_lab.validation_loss"]) == pytest.approx(concept_run.validation[-1][1], rel=1e-5)
    assert json.loads(metadata["lora_lab.config"])["lora"]["rank"] == 32
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    with safe_open(str(concept_run.final_path), framework="pt") as handle:
        assert float(handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))) == 32.0


def test_base_weights_are_unchanged(concept_run, base_model):
    trained = {name.replace(".base_layer", ""): value for name, value in concept_run.model.denoiser.state_dict().items()
               if "lora_" not in name}
    original = base_model.denoiser.state_dict()
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[name], original[name]) for name in original)


def test_strength_zero_is_the_base_model(concept_run, base_model):
    load_into_model(concept_run.model, concept_run.final_path)
    with_lora_off = np.asarray(sample(concept_run.model, PROMPTS[:1], 0.0, seed=3, **SAMPLE)[0], np.float32)
    base = np.asarray(sample(base_model, PROMPTS[:1], 0.0, seed=3, **SAMPLE)[0], np.float32)
    assert np.abs(with_lora_off - base).max() <= 1.0  # identical up to 8-bit rounding
    with_lora = np.asarray(sample(concept_run.model, PROMPTS[:1], 1.0, seed=3, **SAMPLE)[0], np.float32)
    assert np.abs(with_lora - base).mean() > 5.0


def _with_half_alpha(path, tmp_path):
    """The same LoRA written with alpha = rank / 2 and down weights doubled: identical effect, but
    only for a reader that honours alpha (diffusers' kohya export, for one, writes alpha = rank)."""
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".alpha")]:
        name = key.removesuffix(".alpha")
        tensors[key] = tensors[key] / 2
        tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"] * 2
    halved = tmp_path / "half_alpha.safetensors"
    save_file(tensors, str(halved))
    return halved


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_saved_file_reloads_through_diffusers_with_the_same_effect(concept_run, strength, tmp_path):
    path = _with_half_alpha(concept_run.final_path, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(embedded.TINY_MODEL, safety_checker=None, dtype=torch.float32,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    pipe.load_lora_weights(str(path), adapter_name="mine")
    with safe_open(str(path), framework="pt") as handle:
        file_layers = {k.rsplit(".", 2)[0] for k in handle.keys() if k.endswith("lora_down.weight")}  # noqa: SIM118
    assert before == 0
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(file_layers)  # nothing dropped
    pipe.set_adapters(["mine"], adapter_weights=[strength])
    pipe.scheduler = concept_run.model.family.sampling_scheduler(concept_run.model)
    ours = concept_run.model
    load_into_model(ours, path)
    for prompt in PROMPTS[:2]:
        expected = np.asarray(sample(ours, [prompt], strength, seed=5, **SAMPLE)[0], np.float32)
        got = np.asarray(pipe(prompt, num_inference_steps=20, guidance_scale=5.0, width=64, height=64,
                              generator=torch.Generator().manual_seed(5)).images[0], np.float32)
        assert np.abs(expected - got).mean() < 1.0, "diffusers applies the file differently (alpha lost?)"
