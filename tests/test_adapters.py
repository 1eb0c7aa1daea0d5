"""The contract of every adapter type (trainer/adapters/), on each family's tiny model:

- the weight change read back from our file by the format's published formula (written here,
  apart from the exporter: kohya's LoRA, LyCORIS's LoHa and LoKr, with the scales ComfyUI's
  weight_adapter applies) equals PEFT's own merged delta, layer by layer;
- every key is one the type's readers know, and the layer names are the family's;
- a file loads back into a fresh adapter with the same outputs; strength 0 is the base model;
- a run trains each type, writes the kohya/LyCORIS metadata that names it, and resumes exactly.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_lab.trainer.adapters import ADAPTER_NAMES, adapter_of_layer, get_adapter
from lora_lab.trainer.config import build_config
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.embedded import CONCEPT_DATASET
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.examples import TrainingSet
from lora_lab.trainer.export import load_into_model, lora_state_dict, named_layers, save_lora
from lora_lab.trainer.families import FAMILY_NAMES
from lora_lab.trainer.files import read_metadata
from lora_lab.trainer.lora import ADAPTER, add_lora, lora_parameters, set_strength
from lora_lab.trainer.lora_files import check_lora
from lora_lab.trainer.objectives import noise_batch
from lora_lab.trainer.run import load_base_model, train_lora
from safetensors.torch import load_file

from .tiny_models import build

# (adapter, rank): LoKr at rank 2 keeps its large factor low-rank on the tiny layers; at rank 16 both
# factors are full matrices, where ComfyUI (as LyCORIS) applies scale 1 and the exporter folds the scale in.
CASES = [("lora", 4), ("loha", 4), ("lokr", 2), ("lokr", 16), ("dora", 4)]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tmp_path_factory):
    folder = build(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    return load_base_model(build_config({"family": request.param, "base_model": str(folder)}), torch.device("cpu"))


def randomised(base, adapter: str, rank: int, text_encoder: bool):
    """The base with an adapter whose every tensor is random (a trained one, as far as maths goes)."""
    model = copy.deepcopy(base)
    add_lora(model, rank, 3.0, "attention_mlp", text_encoder, adapter)  # alpha / rank not a power of 2
    torch.manual_seed(1)
    for parameter in lora_parameters(model):
        torch.nn.init.normal_(parameter, std=0.1)
    return model


def formula_delta(tensors: dict[str, torch.Tensor], layer: str, base: torch.Tensor) -> torch.Tensor:
    """A layer's weight change from its file tensors, by each format's published formula (DoRA's
    depends on the base weight)."""
    shape = base.shape
    keys = {key[len(layer) + 1:]: value.double() for key, value in tensors.items() if key.startswith(f"{layer}.")}
    alpha = keys.get("alpha")
    if "hada_w1_a" in keys:  # LoHa: alpha / rank · (w1_a w1_b) ⊙ (w2_a w2_b)
        rank = keys["hada_w1_b"].shape[0]
        delta = (keys["hada_w1_a"] @ keys["hada_w1_b"]) * (keys["hada_w2_a"] @ keys["hada_w2_b"]) * alpha / rank
    elif any(key.startswith("lokr_") for key in keys):  # LoKr: scale · w1 ⊗ w2
        w1 = keys["lokr_w1"] if "lokr_w1" in keys else keys["lokr_w1_a"] @ keys["lokr_w1_b"]
        w2 = keys["lokr_w2"] if "lokr_w2" in keys else keys["lokr_w2_a"] @ keys["lokr_w2_b"]
        # alpha / rank of the low-rank factor (w2's where both are), 1 where both are full matrices
        rank = next((keys[f"lokr_{f}_b"].shape[0] for f in ("w2", "w1") if f"lokr_{f}_b" in keys), None)
        delta = torch.kron(w1, w2) * (alpha / rank if rank else 1.0)
    else:  # LoRA: alpha / rank · up down (a file without alpha, as FLUX.2's: scale 1)
        down = keys.get("lora_down.weight", keys.get("lora_A.weight"))
        up = keys.get("lora_up.weight", keys.get("lora_B.weight"))
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0] if alpha is not None else 1.0)
        if "dora_scale" in keys:  # DoRA, input axis: m · (W + ΔW) / ‖W + ΔW‖, the norm over each column
            merged = base.double().flatten(1) + delta
            delta = keys["dora_scale"] * merged / merged.norm(dim=0, keepdim=True) - base.double().flatten(1)
    return delta.reshape(shape)


def _conditioned(model):
    examples = TrainingSet(model, scan_folder(CONCEPT_DATASET), 64, True, True, "", False)
    latents, conditioning = examples.batch([0, 1], torch.float32)
    noised = noise_batch(latents, model.noise_scheduler, model.prediction_type, torch.Generator().manual_seed(0))
    return noised, conditioning


@pytest.mark.parametrize(("adapter", "rank"), CASES, ids=[f"{a}-r{r}" for a, r in CASES])
def test_the_file_means_what_peft_trained(family_model, adapter, rank, tmp_path):
    text_encoder = family_model.family.name != "flux"  # FLUX LoRAs train the transformer only
    model = randomised(family_model, adapter, rank, text_encoder)
    path = tmp_path / "adapter.safetensors"
    save_lora(path, lora_state_dict(model, torch.float32), {})
    tensors = load_file(str(path))
    check_lora(path)  # the header check knows the type
    kind = get_adapter(adapter)
    extended = get_adapter(kind.extends).file_suffixes if kind.extends else ()  # DoRA: LoRA's halves too
    known = (*kind.file_suffixes, *extended, "alpha")
    worst, layers, full = 0.0, 0, 0
    for name, layer in named_layers(model):
        assert adapter_of_layer(layer) is kind
        weight = layer.get_base_layer().weight
        peft_delta = layer.get_delta_weight(ADAPTER).double().reshape(weight.shape)
        ours = formula_delta(tensors, name, weight)
        worst = max(worst, ((ours - peft_delta).abs().max() / peft_delta.abs().max()).item())
        layers += 1
        full += f"{name}.lokr_w2" in tensors
    names = dict(named_layers(model))
    for key in tensors:  # each key is a named layer's, with a suffix the type's readers know
        owner = next((layer for layer in names if key.startswith(f"{layer}.")), None)
        assert owner is not None and key[len(owner) + 1:] in known, key
    print(f"{family_model.family.name} {adapter} rank {rank}: {layers} layers, largest relative difference from "
          f"PEFT's delta {worst:.1e}, {path.stat().st_size / 1024:.0f} KiB")
    assert layers > 0 and worst < 1e-5
    if adapter == "lokr":  # the case each rank is chosen for really happens
        assert full > 0 if rank == 16 else full < layers


@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_a_file_reloads_with_the_same_outputs_and_strength_zero_is_the_base(family_model, adapter, tmp_path):
    model = randomised(family_model, adapter, 4, text_encoder=False)
    path = tmp_path / "adapter.safetensors"
    save_lora(path, lora_state_dict(model, torch.float32), {})
    other = copy.deepcopy(family_model)
    add_lora(other, 4, 3.0, "attention_mlp", False, adapter)  # a fresh adapter of the same type
    load_into_model(other, path)
    noised, conditioning = _conditioned(family_model)
    family = family_model.family
    with torch.no_grad():
        expected = family.predict(model, noised.noisy, noised.timesteps, conditioning)
        got = family.predict(other, noised.noisy, noised.timesteps, conditioning)
        base = family.predict(family_model, noised.noisy, noised.timesteps, conditioning)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        change = (expected - base).abs().mean() / base.abs().mean()
        assert change > 1e-4, f"the adapter changes the output by only {change:.1e} of its size"
        set_strength(other, 0.0)
        zero = family.predict(other, noised.noisy, noised.timesteps, conditioning)
        torch.testing.assert_close(zero, base, atol=0, rtol=0)


def test_a_file_of_another_type_is_refused_before_anything_changes(base_model, tmp_path):
    loha = randomised(base_model, "loha", 4, False)
    path = tmp_path / "loha.safetensors"
    save_lora(path, lora_state_dict(loha), {})
    lora = randomised(base_model, "lora", 4, False)
    before = [p.clone() for p in lora_parameters(lora)]
    with pytest.raises(LoraLabError, match="trained as another adapter type \\(this run trains LoRA\\)"):
        load_into_model(lora, path)
    assert all(torch.equal(a, b) for a, b in zip(before, lora_parameters(lora), strict=True))


def test_the_header_check_refuses_broken_lycoris_layers(tmp_path):
    from safetensors.torch import save_file

    broken = {
        "mixes LoHa and LoRA keys": {"lora_unet_x.hada_w1_a": torch.zeros(8, 2), "lora_unet_x.lora_down.weight":
                                     torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2)},
        "lacks hada_w2_a, hada_w2_b": {"lora_unet_x.hada_w1_a": torch.zeros(8, 2),
                                       "lora_unet_x.hada_w1_b": torch.zeros(2, 8)},
        "do not fit together": {"lora_unet_x.hada_w1_a": torch.zeros(8, 2), "lora_unet_x.hada_w1_b": torch.zeros(3, 8),
                                "lora_unet_x.hada_w2_a": torch.zeros(8, 2), "lora_unet_x.hada_w2_b": torch.zeros(2, 8)},
        "needs either lokr_w2 or both": {"lora_unet_x.lokr_w1": torch.zeros(2, 2),
                                         "lora_unet_x.lokr_w2_a": torch.zeros(4, 2)},
    }
    for problem, tensors in broken.items():
        path = tmp_path / "broken.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(LoraLabError, match=problem):
            check_lora(path)


@pytest.mark.parametrize("adapter", ["loha", "lokr", "dora"])
def test_a_run_trains_the_type_and_its_metadata_names_it(make_config, fresh_model, adapter):
    settings = {"adapter": adapter, "rank": 4, "steps": 3, "resolution": 64, "batch_size": 2, "name": adapter,
                "learning_rate": 1e-2, "sample_every": -1, "validation_images": -1,
                **({"lokr_factor": 4} if adapter == "lokr" else {})}
    result = train_lora(make_config(**settings), model=fresh_model)
    layers = [layer for _, layer in named_layers(result.model)]
    assert layers and {adapter_of_layer(layer).name for layer in layers} == {adapter}
    if adapter == "lokr":  # factor 4: the small factor is 4 x 4 wherever the layer's sides divide by 4
        assert {tuple(layer.lokr_w1[ADAPTER].shape) for layer in layers} == {(4, 4)}
    metadata = read_metadata(result.final_path)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    arguments = json.loads(metadata["ss_network_args"])
    # LyCORIS writes a DoRA as its LoRA ("lora", LoCon) with the decomposition on the input axis.
    assert arguments["algo"] == ("lora" if adapter == "dora" else adapter) and arguments["targets"] == "attention"
    assert (arguments.get("dora_wd"), arguments.get("wd_on_output")) == (("True", "False") if adapter == "dora"
                                                                         else (None, None))
    assert (arguments.get("factor") == "4") == (adapter == "lokr")
    assert json.loads(metadata["lora_lab.config"])["lora"]["adapter"] == adapter
    assert f"A {get_adapter(adapter).title} for" in metadata["modelspec.description"]
    tensors = load_file(str(result.final_path))
    assert any(key.endswith({"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[adapter])
               for key in tensors)
    if adapter == "dora":  # trained: the magnitudes moved off the base's column norms
        layer = layers[0]
        norms = layer.get_base_layer().weight.float().norm(dim=0, keepdim=True)
        assert not torch.equal(layer.dora_scale[ADAPTER].detach(), norms)


def test_settings_of_one_type_are_refused_for_another():
    with pytest.raises(LoraLabError, match="lokr_factor = 4 belongs to the lokr adapter; this run trains loha"):
        build_config({"adapter": "loha", "lokr_factor": 4})
    with pytest.raises(LoraLabError, match="adapter = 'boft' is not allowed"):
        build_config({"adapter": "boft"})
    assert build_config({"adapter": "lokr", "lokr_factor": 8}).lora.adapter_options() == {"lokr_factor": 8}
