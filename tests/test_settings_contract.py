"""What you set is what trains.

1. Every setting the config declares, under every preset, given through the command line, a
   config file or the Train LoRA node's widgets, survives resolution unchanged: a preset only
   fills in what was left at 0.
2. Every setting reaches the objects that train (optimizer, LoRA layers, schedule, objective,
   precision, batches, checkpoints ...) and the LoRA's metadata: recorded by spies on a few real
   runs of the tiny models.
3. The options that change the maths take effect: the v-prediction target, the offset noise,
   recomputed blocks under gradient checkpointing, and bf16 compute.
"""

from __future__ import annotations

import copy
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_lab.trainer import budget, loop, run
from lora_lab.trainer.captions import CaptionVariation
from lora_lab.trainer.cli import build_parser, gather_settings
from lora_lab.trainer.config import PRESETS, TrainingConfig, build_config, field_specs, load_settings_file
from lora_lab.trainer.data import Dataset, ImageItem
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.families import get_family
from lora_lab.trainer.files import read_metadata
from lora_lab.trainer.fp8 import Float8Linear
from lora_lab.trainer.loop import seed_noise
from lora_lab.trainer.lora import ADAPTER, lora_layers
from PIL import Image

from .tiny_models import build

# One explicit, non-default value per setting. A setting added to the config without a line here
# fails test_every_setting_has_a_contract_value.
EXPLICIT: dict[str, Any] = {
    "family": "sdxl", "base_model": "/models/base.safetensors", "model_config": "/models/config",
    "prediction_type": "v_prediction", "dataset": "/data/my_set", "resolution": 768, "bucketing": False,
    "trigger_word": "xyz_toy", "cache_dir": "/cache/lora_lab", "cache": False, "rank": 8, "alpha": 4.0,
    "targets": "to_q,to_v", "train_text_encoder": True, "optimizer": "prodigy", "learning_rate": 0.005,
    "text_encoder_lr": 2e-5, "lr_scheduler": "cosine", "warmup_steps": 10, "weight_decay": 0.05,
    "max_grad_norm": 0.5, "preset": "character", "steps": 123, "batch_size": 2, "gradient_accumulation": 3,
    "gradient_checkpointing": True, "fp8_base": True, "mixed_precision": "bf16", "min_snr_gamma": 5.0,
    "noise_offset": 0.1, "check_memory": False, "flow_shift": 2.0, "train_guidance": 3.5, "seed": 7,
    "output_dir": "/out/loras", "name": "xyz", "save_every": 50, "overwrite": True, "resume": "latest",
    "resume_with_changes": True, "prompts": ("a {trigger}", "b, with a comma"), "strengths": (0.3, 0.9),
    "sample_steps": 12, "guidance_scale": 3.0, "sample_seed": 9, "sample_every": 5, "validation_images": 3,
    "validation_every": 7, "caption_dropout": 0.1, "shuffle_tags": True, "keep_tokens": 2, "adapter": "lokr",
    "lokr_factor": 4, "init_lora": "/loras/start.safetensors", "reg_dataset": "/data/class_images",
    "prior_loss_weight": 0.5, "masked_loss": True, "mask_min_weight": 0.2, "flip_augment": True, "color_jitter": 0.1,
    "random_crop": True, "resolutions": (512, 768),
}
# A setting that belongs with another is given with it (alone it is refused, by design): the LoKr factor
# with the lokr type, the text encoder's learning rate with the text encoder trained.
COMPANIONS: dict[str, dict[str, Any]] = {"lokr_factor": {"adapter": "lokr"},
                                          "text_encoder_lr": {"train_text_encoder": True},
                                          "mask_min_weight": {"masked_loss": True}}
SETTINGS = list(field_specs())


def test_every_setting_has_a_contract_value():
    assert set(EXPLICIT) == set(SETTINGS)
    defaults = TrainingConfig()
    assert [name for name in SETTINGS if EXPLICIT[name] == defaults.value(name)] == []


def resolved(config: TrainingConfig) -> TrainingConfig:
    """The config as a run resolves it, for a model of the config's family."""
    family = get_family(config.model.family if config.model.family != "auto" else "sd15")
    model = types.SimpleNamespace(family=family, resolution=family.default_resolution)
    dataset = Dataset(items=[ImageItem(Path(f"{i}.png"), "x", 1, "", (512, 512)) for i in range(5)])
    return run.resolve_config(config, dataset, model)


def cli_config(name: str, value: Any, preset: str) -> TrainingConfig:
    shown = ("|" if name == "prompts" else ",").join(map(str, value)) if isinstance(value, tuple) else str(value)
    arguments = ["train", "--preset", preset] + ([] if name == "preset" else ["--" + name.replace("_", "-"), shown])
    for companion, companion_value in COMPANIONS.get(name, {}).items():
        arguments += ["--" + companion.replace("_", "-"), str(companion_value)]
    return build_config(gather_settings(build_parser().parse_args(arguments)))


def file_config(name: str, value: Any, preset: str, folder: Path) -> TrainingConfig:
    section = field_specs()[name][0]
    text = json.dumps({"preset": preset, **COMPANIONS.get(name, {}),
                       section: {name: list(value) if isinstance(value, tuple) else value}})
    if name == "preset":
        text = json.dumps({"train": {"preset": value}})
    path = folder / "run.json"
    path.write_text(text)
    return build_config(load_settings_file(path))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_explicit_values_survive_every_preset_through_cli_and_config_file(preset, tmp_path):
    for name in SETTINGS:
        wanted = preset if name == "preset" else EXPLICIT[name]
        for entry, config in (("cli", cli_config(name, EXPLICIT[name], preset)),
                              ("file", file_config(name, EXPLICIT[name], preset, tmp_path))):
            got = resolved(config).value(name)
            if name == "preset":
                wanted = EXPLICIT["preset"] if entry == "file" else preset
            assert got == wanted, f"{name} through the {entry} under preset {preset}: {got!r}"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_explicit_node_widgets_survive_every_preset(nodes, preset, tmp_path):
    from lora_lab.nodes.train_lora import TrainLora, node_config

    widgets = {i.id: i.options["default"] for i in TrainLora.define_schema().inputs if "default" in i.options}
    assert "preset" in widgets
    for name in (n for n in widgets if n in field_specs()):
        values = {**widgets, **COMPANIONS.get(name, {}), "preset": preset,
                  name: EXPLICIT[name] if name != "preset" else preset}
        if name in ("resume", "init_lora"):
            continue  # combos of the run's checkpoints and of the loras folder; test_nodes checks each choice
        config = resolved(node_config(values, tmp_path))
        wanted = EXPLICIT[name] if name not in ("preset", "output_dir") else values[name]
        assert config.value(name) == wanted, f"{name} through the node under preset {preset}"
    empty = resolved(node_config({**widgets, "preset": preset}, tmp_path))
    assert (empty.lora.rank, empty.optimizer.learning_rate) == (PRESETS[preset]["rank"],
                                                                PRESETS[preset]["learning_rate"])


# --- 2. the values reach what trains ---------------------------------------------------------

@dataclass
class Trace:
    """What the spies saw during one run."""

    optimizer: Any = None
    noise_calls: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    clip_norms: list[float] = field(default_factory=list)
    training_sets: list[Any] = field(default_factory=list)
    loads: list[tuple] = field(default_factory=list)
    result: Any = None


@pytest.fixture
def traced(monkeypatch):
    """Runs train_lora with spies on the objects the loop drives; returns a Trace."""

    def trace_run(config: TrainingConfig, model) -> Trace:
        trace = Trace()
        real_optimizer, real_noise, real_clip = loop.build_optimizer, loop.noise_batch, torch.nn.utils.clip_grad_norm_
        real_training_set = run.TrainingSet

        def optimizer_spy(*args, **kwargs):
            trace.optimizer = real_optimizer(*args, **kwargs)
            return trace.optimizer

        def noise_spy(latents, scheduler, prediction_type, generator, noise_offset, min_snr_gamma, flow_shift):
            trace.noise_calls.append({"shape": tuple(latents.shape), "prediction_type": prediction_type,
                                      "noise_offset": noise_offset, "min_snr_gamma": min_snr_gamma,
                                      "flow_shift": flow_shift, "seed": generator.initial_seed()})
            return real_noise(latents, scheduler, prediction_type, generator, noise_offset, min_snr_gamma, flow_shift)

        def predict_spy(model, noisy, timesteps, conditioning):
            if noisy.device.type != "meta" and torch.is_grad_enabled():  # not the memory probe, validation, samples
                trace.predictions.append({"autocast": torch.is_autocast_enabled("cpu")
                                          and torch.get_autocast_dtype("cpu"),
                                          "checkpointing": model.denoiser.is_gradient_checkpointing,
                                          "guidance": model.guidance, "conditioning": sorted(conditioning)})
            return type(model.family).predict(model.family, model, noisy, timesteps, conditioning)

        def clip_spy(parameters, max_norm, *args, **kwargs):
            trace.clip_norms.append(max_norm)
            return real_clip(parameters, max_norm, *args, **kwargs)

        def training_set_spy(*args):
            trace.training_sets.append(real_training_set(*args))
            return trace.training_sets[-1]

        monkeypatch.setattr(loop, "build_optimizer", optimizer_spy)
        monkeypatch.setattr(loop, "noise_batch", noise_spy)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
        monkeypatch.setattr(run, "TrainingSet", training_set_spy)
        monkeypatch.setattr(model.family, "predict", lambda *args: predict_spy(*args))
        trace.result = run.train_lora(config, model=model)
        monkeypatch.undo()
        return trace

    return trace_run


def lora_facts(model) -> dict[str, Any]:
    layers = [(prefix, path, layer) for prefix, module in model.lora_modules() for path, layer in lora_layers(module)]
    return {"ranks": {layer.r[ADAPTER] for *_, layer in layers},
            "alphas": {layer.lora_alpha[ADAPTER] for *_, layer in layers},
            "endings": {path.rsplit(".", 1)[-1] for prefix, path, _ in layers if prefix == "lora_unet"},
            "text_layers": sum(prefix != "lora_unet" for prefix, *_ in layers)}


def metadata_config(result) -> dict[str, Any]:
    nested = json.loads(read_metadata(result.final_path)["lora_lab.config"])
    return {name: value for section in nested.values() for name, value in section.items()}


def check_metadata(result, names: list[str], settings: dict[str, Any]) -> None:
    saved = metadata_config(result)
    for name in names:
        wanted = settings[name]
        wanted = list(wanted) if isinstance(wanted, tuple) else wanted
        if field_specs()[name][1].metadata["path"] and wanted:
            wanted = Path(wanted).name  # shared files carry names, never the trainer's folders
        assert saved[name] == wanted, name


def test_a_run_trains_with_what_was_set(traced, make_config, fresh_model, tmp_path, cpu_bf16):
    settings = {"preset": "style", "rank": 4, "alpha": 2.0, "targets": "to_q,to_v", "train_text_encoder": True,
                "text_encoder_lr": 2e-5, "learning_rate": 0.005, "lr_scheduler": "cosine", "warmup_steps": 1,
                "weight_decay": 0.05, "max_grad_norm": 0.5, "steps": 4, "batch_size": 2, "gradient_accumulation": 2,
                "gradient_checkpointing": True, "mixed_precision": "bf16", "min_snr_gamma": 5.0, "noise_offset": 0.1,
                "prediction_type": "v_prediction", "seed": 7, "resolution": 48, "bucketing": False,
                "trigger_word": "xyz_toy", "cache": False, "save_every": 2, "name": "contract", "check_memory": False,
                "prompts": ("a {trigger}", "b"), "strengths": (0.3, 0.9), "sample_steps": 12,
                "guidance_scale": 3.0, "sample_seed": 9, "optimizer": "adamw", "validation_images": 3,
                "validation_every": 1, "sample_every": 3, "caption_dropout": 0.1, "shuffle_tags": True,
                "keep_tokens": 2}
    trace = traced(make_config(**settings), fresh_model)
    result, facts = trace.result, lora_facts(trace.result.model)
    assert facts["ranks"] == {4} and facts["alphas"] == {2.0}  # not the style preset's rank 16
    assert facts["endings"] == {"to_q", "to_v"} and facts["text_layers"] > 0
    groups = trace.optimizer.param_groups
    assert isinstance(trace.optimizer, torch.optim.AdamW)
    assert [g["initial_lr"] for g in groups] == [0.005, 2e-5] and {g["weight_decay"] for g in groups} == {0.05}
    learning_rates = [lr for _, _, lr in result.losses]  # warm-up 1, then cosine down to the end
    assert learning_rates[0] == pytest.approx(0.0025) and learning_rates[1] == pytest.approx(0.005)
    assert learning_rates[1] > learning_rates[2] > learning_rates[3]
    assert trace.clip_norms == [0.5] * 4
    assert len(result.losses) == 4 and [c.step for c in result.checkpoints] == [2, 4]
    assert len(trace.noise_calls) == len(trace.predictions) == 8  # 4 steps x accumulation 2
    assert {c["shape"] for c in trace.noise_calls} == {(2, 4, 12, 12)}  # batch 2, 48 px square, 4 px per latent
    assert {(c["prediction_type"], c["noise_offset"], c["min_snr_gamma"]) for c in trace.noise_calls} == {
        ("v_prediction", 0.1, 5.0)}
    # Each micro-batch's noise is seeded by the run's seed and the micro-batch's number (loop.seed_noise).
    assert [c["seed"] for c in trace.noise_calls] == [seed_noise(torch.Generator(), 7, n).initial_seed()
                                                      for n in range(8)]
    assert {(p["autocast"], p["checkpointing"]) for p in trace.predictions} == {(torch.bfloat16, True)}
    training_set, held_out = trace.training_sets
    assert training_set.variation == CaptionVariation(0.1, True, 2, 7)  # the seed decides each batch's captions
    assert held_out.variation == CaptionVariation()  # validation measures the captions as written
    assert not training_set.cache_latents and {e.bucket for e in training_set.examples} == {(48, 48)}
    assert (len(training_set.examples), len(held_out.examples)) == (9, 3)  # 3 of the 12 held out
    assert [step for step, _ in result.validation] == [1, 2, 3, 4]  # every step, and at each checkpoint
    assert [sheet["step"] for sheet in result.samples] == [2, 3, 4]  # every 3 steps, and at each checkpoint
    sheet = Image.open(result.run_dir / result.samples[-1]["file"])
    assert sheet.width == 240 + 2 * 256  # one cell a prompt: "a xyz_toy" and "b"
    assert result.run_dir.name == "contract" and result.final_path.name == "contract.safetensors"
    assert read_metadata(result.final_path)["modelspec.trigger_phrase"] == "xyz_toy"
    check_metadata(result, list(settings), settings)


def test_a_second_run_trains_with_what_was_set(traced, make_config, fresh_model, tmp_path):
    cache = tmp_path / "cache"
    settings = {"preset": "likeness", "optimizer": "prodigy", "learning_rate": 1.0, "fp8_base": True,
                "cache_dir": str(cache), "cache": True, "bucketing": True, "resolution": 64, "steps": 2,
                "mixed_precision": "no", "dataset": str(run.embedded.CONCEPT_DATASET)}
    trace = traced(make_config(**settings), fresh_model)
    result, facts = trace.result, lora_facts(trace.result.model)
    assert type(trace.optimizer).__name__ == "Prodigy" and trace.optimizer.param_groups[0]["initial_lr"] == 1.0
    assert facts["ranks"] == {32}  # rank left at 0: the likeness preset's
    assert any(isinstance(m, Float8Linear) for m in result.model.denoiser.modules())
    assert trace.training_sets[0].cache_latents and len(list(cache.iterdir())) > 0
    assert len({e.bucket for e in trace.training_sets[0].examples}) > 1  # wide, tall and square images
    assert {p["autocast"] for p in trace.predictions} == {False}
    check_metadata(result, list(settings), settings)


def test_flux_settings_reach_the_flow_objective(traced, tmp_path):
    folder = build("flux", tmp_path / "flux")
    config = build_config({"base_model": str(folder), "flow_shift": 2.0, "train_guidance": 3.5, "steps": 2,
                           "rank": 4, "resolution": 64, "output_dir": str(tmp_path / "out")})
    model = run.load_base_model(config, torch.device("cpu"))
    trace = traced(config, model)
    assert {c["flow_shift"] for c in trace.noise_calls} == {2.0} and {p["guidance"] for p in trace.predictions} == {3.5}
    check_metadata(trace.result, ["flow_shift", "train_guidance", "base_model"], {
        "flow_shift": 2.0, "train_guidance": 3.5, "base_model": str(folder)})


# Each flow family's own shift at 64 px: FLUX.1-dev's and FLUX.2's dynamic one at 16 tokens (2x2 patches of
# 8x8 latents; FLUX.2's 4x4 latents are a token each), Z-Image's fixed 3.
DYNAMIC_AT_16_TOKENS = math.exp(0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256))
OWN_FLOW_SHIFT = {"flux": DYNAMIC_AT_16_TOKENS, "zimage": 3.0, "flux2": DYNAMIC_AT_16_TOKENS}


@pytest.mark.parametrize("family", sorted(OWN_FLOW_SHIFT))
@pytest.mark.parametrize("flow_shift", [0.0, 2.0])
def test_the_flow_shift_is_the_models_own_unless_set(traced, tmp_path, family, flow_shift):
    folder = build(family, tmp_path / family)
    config = build_config({"base_model": str(folder), "flow_shift": flow_shift, "steps": 1, "rank": 4,
                           "resolution": 64, "output_dir": str(tmp_path / "out")})
    trace = traced(config, run.load_base_model(config, torch.device("cpu")))
    assert [c["flow_shift"] for c in trace.noise_calls] == pytest.approx([flow_shift or OWN_FLOW_SHIFT[family]])


def test_model_settings_choose_what_is_loaded(monkeypatch, tmp_path):
    family = get_family("sd15")
    seen = []
    monkeypatch.setattr(family, "load", lambda source, dtype, config_dir: seen.append((source, config_dir)) or 1 / 0)
    config = build_config({"family": "sd15", "base_model": str(tmp_path / "m.safetensors"),
                           "model_config": str(tmp_path / "configs")})
    with pytest.raises(ZeroDivisionError):
        run.load_base_model(config, torch.device("cpu"))
    assert seen == [(str(tmp_path / "m.safetensors"), str(tmp_path / "configs"))]


def test_check_memory_decides_whether_a_tight_run_is_refused(make_config, base_model, monkeypatch):
    monkeypatch.setattr(budget, "free_memory", lambda device: 1024)  # 1 KiB free: nothing fits
    with pytest.raises(LoraLabError, match="more cpu memory"):
        run.train_lora(make_config(steps=1, name="a"), model=copy.deepcopy(base_model))
    result = run.train_lora(make_config(steps=1, check_memory=False, name="b"), model=copy.deepcopy(base_model))
    assert len(result.losses) == 1


def test_output_and_resume_settings_continue_the_run(make_config, base_model):
    first = run.train_lora(make_config(steps=2, name="again"), model=copy.deepcopy(base_model))
    with pytest.raises(LoraLabError, match="already exists"):
        run.train_lora(make_config(steps=2, name="again"), model=copy.deepcopy(base_model))
    replaced = run.train_lora(make_config(steps=2, name="again", overwrite=True, seed=3), model=copy.deepcopy(
        base_model))
    assert replaced.run_dir == first.run_dir and replaced.losses != first.losses
    with pytest.raises(LoraLabError, match="steps: 2 -> 4"):
        run.train_lora(make_config(steps=4, name="again", seed=3, resume="latest"), model=copy.deepcopy(base_model))
    resumed = run.train_lora(make_config(steps=4, name="again", seed=3, resume="latest", resume_with_changes=True),
                             model=copy.deepcopy(base_model))
    assert [step for step, _, _ in resumed.losses] == [1, 2, 3, 4] and resumed.losses[:2] == replaced.losses


# --- 3. options that change the maths take effect ---------------------------------------------

def _capture(monkeypatch, name: str, module=loop) -> list:
    """Records every (args, result) of a function the loop calls."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        output = real(*args, **kwargs)
        calls.append((args, kwargs, output))
        return output

    monkeypatch.setattr(module, name, spy)
    return calls


def test_v_prediction_trains_on_the_velocity(make_config, fresh_model, monkeypatch):
    calls = _capture(monkeypatch, "noise_batch")
    run.train_lora(make_config(steps=1, batch_size=2, prediction_type="v_prediction"), model=fresh_model)
    (latents, scheduler, *_), _, noised = calls[0]
    alpha_bar = scheduler.alphas_cumprod[noised.timesteps].view(-1, 1, 1, 1)
    noise = (noised.noisy - alpha_bar.sqrt() * latents) / (1 - alpha_bar).sqrt()
    assert torch.allclose(noised.target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-4)
    assert not torch.allclose(noised.target, noise, atol=1e-2)  # not the epsilon target


def test_noise_offset_shifts_each_channel_of_the_noise(make_config, base_model, monkeypatch):
    from lora_lab.trainer import objectives

    noises = {}
    for offset in (0.0, 0.5):
        calls = _capture(monkeypatch, "make_noise", objectives)
        run.train_lora(make_config(steps=1, batch_size=2, noise_offset=offset, name=f"offset{offset}"),
                       model=copy.deepcopy(base_model))
        noises[offset] = calls[0][2]
        monkeypatch.undo()
    shift = noises[0.5] - noises[0.0]  # the same seed: only the offset differs
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-5)  # constant over each channel
    assert per_channel.abs().mean() > 0.1


def test_gradient_checkpointing_recomputes_blocks(make_config, base_model):
    counts = {False: [0], True: [0]}
    for on, calls in counts.items():
        model = copy.deepcopy(base_model)
        for module in model.denoiser.modules():
            if type(module).__name__ in ("ResnetBlock2D", "Transformer2DModel"):
                # A pre-hook: the recomputation stops early, before a block's own forward hook would run.
                module.register_forward_pre_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        run.train_lora(make_config(steps=1, gradient_checkpointing=on, name=f"gc{on}", check_memory=False,
                                   validation_images=-1, sample_every=-1), model=model)
    blocks = counts[False][0]
    # Blocks that gradients flow through (those after the first LoRA layer) run again in the backward pass.
    assert blocks == 12 and counts[True][0] >= blocks + 4


def test_bf16_mixed_precision_computes_in_bf16(make_config, fresh_model, cpu_bf16):
    dtypes = set()
    for module in fresh_model.denoiser.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _, __, output: dtypes.add(output.dtype))
    run.train_lora(make_config(steps=1, mixed_precision="bf16"), model=fresh_model)
    assert dtypes == {torch.bfloat16}


def test_a_run_resolves_its_config_once(make_config, base_model, monkeypatch):
    """The config is resolved once, up front (run.resolve_config), and handed down frozen: the only
    other config a run builds is its training graph's prompt (trainer/workflow.py)."""
    built = []
    real = run.build_config
    monkeypatch.setattr(run, "build_config", lambda *args, **kwargs: built.append(args) or real(*args, **kwargs))
    result = run.train_lora(make_config(steps=1, name="once", sample_every=-1), model=copy.deepcopy(base_model))
    assert len(built) == 2 and result.config.lora.rank == PRESETS["none"]["rank"]
