"""Every training option works: each runs a few real steps on the tiny model, and the maths of
schedules, objectives and weighting is checked against its definition."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from lora_lab.trainer.config import build_config
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.loop import build_optimizer, lr_factor
from lora_lab.trainer.lora import add_lora, lora_parameters
from lora_lab.trainer.objectives import min_snr_weights, noise_batch
from lora_lab.trainer.run import train_lora

# No validation or samples: these tests are about what trains (test_watch.py has those).
QUICK = {"steps": 3, "rank": 4, "batch_size": 2, "learning_rate": 1e-3, "save_every": 3, "validation_images": -1,
         "sample_every": -1}


@pytest.mark.parametrize("options", [
    {"optimizer": "prodigy", "learning_rate": 1.0},
    {"lr_scheduler": "cosine", "warmup_steps": 1},
    {"lr_scheduler": "linear"},
    {"gradient_checkpointing": True},
    {"gradient_accumulation": 2},
    {"min_snr_gamma": 5.0, "noise_offset": 0.1},
    {"prediction_type": "v_prediction"},
    {"train_text_encoder": True, "targets": "attention_mlp"},
    {"targets": "to_q,to_v"},
    {"mixed_precision": "bf16"},
    {"cache": False, "bucketing": False},
    {"preset": "style"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_trains(make_config, fresh_model, options, request):
    if options.get("mixed_precision") == "bf16":
        request.getfixturevalue("cpu_bf16")
    config = make_config(**{**QUICK, **options})
    result = train_lora(config, model=fresh_model)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for _, loss, _ in result.losses)
    assert any(float(p.abs().max()) > 0 for p in lora_parameters(result.model)[1::2])  # B moved from zero
    assert result.final_path.is_file()


def test_disk_cache_is_reused(make_config, fresh_model, base_model, tmp_path, caplog):
    import copy
    import dataclasses
    import logging

    cache = tmp_path / "cache"
    train_lora(make_config(**QUICK, cache_dir=str(cache), name="a"), model=fresh_model)
    from lora_lab.trainer import embedded
    from lora_lab.trainer.data import scan_folder

    captions = {item.caption for item in scan_folder(embedded.CONCEPT_DATASET).items}
    entries = sorted(cache.iterdir())
    assert len(entries) == 12 + len(captions)  # the latents of 12 images, each distinct caption once
    with caplog.at_level(logging.INFO, logger="lora_lab.trainer.examples"):
        train_lora(make_config(**QUICK, cache_dir=str(cache), name="b"), model=copy.deepcopy(base_model))
    assert "24 reused, 0 computed" in caplog.text  # a latent and a caption lookup per image
    caplog.clear()
    other = copy.deepcopy(base_model)  # another model of the same name (two checkpoints in a ComfyUI graph)
    other.identity = dataclasses.replace(other.identity, key="other weights")
    with caplog.at_level(logging.INFO, logger="lora_lab.trainer.examples"):
        train_lora(make_config(**QUICK, cache_dir=str(cache), name="c"), model=other)
    # As the first run: each image and each distinct caption computed (repeated captions reuse their own).
    assert f"{12 - len(captions)} reused, {12 + len(captions)} computed" in caplog.text  # none of the other model


def test_adamw8bit_explains_what_it_needs(make_config, fresh_model):
    add_lora(fresh_model, 4, 4.0, "attention", False)
    with pytest.raises(LoraLabError, match="adamw8bit runs only on a CUDA GPU; use adamw"):
        build_optimizer(make_config(optimizer="adamw8bit"), fresh_model)


def test_learning_rate_schedules():
    warm = lr_factor(build_config({"warmup_steps": 4, "lr_scheduler": "cosine"}), total_steps=14)
    assert [round(warm(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert warm(4) == 1.0 and warm(9) == pytest.approx(0.5) and warm(14) == pytest.approx(0.0)
    linear = lr_factor(build_config({"lr_scheduler": "linear"}), total_steps=10)
    assert linear(5) == pytest.approx(0.5)
    assert lr_factor(build_config({}), total_steps=10)(7) == 1.0


def test_objectives_match_their_definitions():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(4, 4, 8, 8)
    eps = noise_batch(latents, scheduler, "epsilon", torch.Generator().manual_seed(0))
    alpha_bar = scheduler.alphas_cumprod[eps.timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(eps.noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * eps.target, atol=1e-5)
    v = noise_batch(latents, scheduler, "v_prediction", torch.Generator().manual_seed(0))
    assert torch.allclose(v.target, alpha_bar.sqrt() * eps.target - (1 - alpha_bar).sqrt() * latents, atol=1e-5)
    timesteps = torch.tensor([10, 500, 990])
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr)
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0, "v_prediction"),
                          torch.clamp(snr, max=5) / (snr + 1))


def test_nan_loss_stops_with_advice(make_config, fresh_model, monkeypatch):
    from lora_lab.trainer import loop

    monkeypatch.setattr(loop, "weighted_mse", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(LoraLabError, match="loss became nan at step 1.*learning rate too high.*bf16"):
        train_lora(make_config(**QUICK), model=fresh_model)
