"""The contract every registered family keeps, run over each on tiny random configs: training
steps give finite, falling loss; only LoRA weights change; the exported file reloads through
diffusers' own `load_lora_weights` with nothing dropped and the same outputs; strength 0 is the
base model."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_lab.trainer.config import build_config
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.embedded import CONCEPT_DATASET
from lora_lab.trainer.examples import TrainingSet
from lora_lab.trainer.export import load_into_model, lora_state_dict, save_lora
from lora_lab.trainer.families import FAMILY_NAMES
from lora_lab.trainer.fp8 import quantizable_layers
from lora_lab.trainer.lora import add_lora, lora_parameters, set_strength
from lora_lab.trainer.objectives import noise_batch
from lora_lab.trainer.run import load_base_model, train_lora
from peft.tuners.lora import LoraLayer

from .tiny_models import build

RESOLUTION = 64


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tmp_path_factory):
    name = request.param
    folder = build(name, tmp_path_factory.mktemp(f"tiny-{name}"))
    config = build_config({"family": name, "base_model": str(folder)})
    return name, folder, load_base_model(config, torch.device("cpu"))


def _batch(model, text_encoder: bool = False):
    dataset = scan_folder(CONCEPT_DATASET)
    examples = TrainingSet(model, dataset, RESOLUTION, True, True, "", text_encoder)
    return examples.batch([0, 1], torch.float32)


def _noised(model, latents, seed=0):
    return noise_batch(latents, model.noise_scheduler, model.prediction_type, torch.Generator().manual_seed(seed))


def test_training_runs_with_finite_loss_and_touches_only_the_lora(family_model, tmp_path):
    name, folder, base = family_model
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    config = build_config({"family": name, "base_model": str(folder), "steps": 4, "rank": 4, "batch_size": 2,
                           "resolution": RESOLUTION, "output_dir": str(tmp_path), "name": name})
    result = train_lora(config, model=model)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result.losses)
    after = model.denoiser.state_dict()
    changed = {k for k in after if "lora_" not in k and not torch.equal(after[k], before[k.replace(
        ".base_layer", "")])}
    assert not changed  # the base model is bit-identical
    assert any("lora_B" in k and after[k].abs().sum() > 0 for k in after)  # and the LoRA learned something


def test_loss_falls_on_a_fixed_batch(family_model):
    _, _, base = family_model
    model = copy.deepcopy(base)
    latents, conditioning = _batch(model)
    add_lora(model, 8, 8, "attention_mlp", False)
    optimizer = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    noised = _noised(model, latents)
    losses = []
    for _ in range(30):
        loss = (model.family.predict(model, noised.noisy, noised.timesteps, conditioning) - noised.target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"{model.family.name}: fixed-batch loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.7 * losses[0]


def test_export_reloads_through_diffusers_with_the_same_outputs(family_model, tmp_path):
    name, _, base = family_model
    model = copy.deepcopy(base)
    train_text = bool(model.family.text_encoder_prefixes)  # FLUX's and Z-Image's train the transformer only
    add_lora(model, 4, 2.0, "attention_mlp", train_text)
    torch.manual_seed(1)
    for parameter in lora_parameters(model):
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(model), {})
    load_into_model(model, path)  # ours now holds exactly the file's (fp16-rounded) weights

    fresh = copy.deepcopy(base)
    pipe = fresh.family.pipeline(fresh)
    pipe.load_lora_weights(str(path))
    modules = [fresh.denoiser, *(fresh.text_encoders if train_text else [])]
    loaded = sum(isinstance(m, LoraLayer) for module in modules for m in module.modules())
    ours = sum(isinstance(m, LoraLayer) for _, module in model.lora_modules() for m in module.modules())
    assert loaded == ours  # nothing dropped, nothing extra

    with torch.no_grad():
        latents, _ = _batch(base)
        captions = ["zkw_toy, a ring", "a gray square"]
        expected_text, got_text = model.encoders.encode_prompts(captions), fresh.encoders.encode_prompts(captions)
        for key in expected_text:
            torch.testing.assert_close(got_text[key], expected_text[key], atol=1e-5, rtol=1e-4)
        _, conditioning = _batch(model)
        noised = _noised(model, latents)
        expected = model.family.predict(model, noised.noisy, noised.timesteps, conditioning)
        got = fresh.family.predict(fresh, noised.noisy, noised.timesteps, conditioning)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        base_output = base.family.predict(base, noised.noisy, noised.timesteps, conditioning)
        assert (expected - base_output).abs().mean() > 1e-4  # the LoRA does something
        set_strength(model, 0.0)
        zero = model.family.predict(model, noised.noisy, noised.timesteps, conditioning)
        torch.testing.assert_close(zero, base_output, atol=0, rtol=0)  # strength 0 is the base model


def test_fp8_base_trains_with_a_quarter_of_the_fp32_linear_memory(family_model, tmp_path):
    name, folder, base = family_model
    model = copy.deepcopy(base)
    linear_bytes = sum(m.weight.numel() * 4 for m in quantizable_layers(model.denoiser, model.family.fp8_kept))
    before = sum(t.numel() * t.element_size() for t in model.denoiser.state_dict().values())
    config = build_config({"family": name, "base_model": str(folder), "steps": 3, "rank": 4, "batch_size": 2,
                           "resolution": RESOLUTION, "output_dir": str(tmp_path), "name": name, "fp8_base": True})
    result = train_lora(config, model=model)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result.losses)
    after = sum(t.numel() * t.element_size() for k, t in model.denoiser.state_dict().items() if "lora_" not in k)
    assert before - after >= 0.7 * linear_bytes  # 4 bytes -> 1 byte (+ a scale per row)
    assert result.final_path.is_file()
