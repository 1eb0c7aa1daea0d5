"""Settings: the guide's defaults and presets, explicit values winning, ranges enforced with
messages that name the field, and config files."""

from __future__ import annotations

import json

import pytest
from lora_lab.trainer.config import (
    TrainingConfig,
    auto_steps,
    build_config,
    load_settings_file,
    with_preset_values,
)
from lora_lab.trainer.errors import LoraLabError


def test_defaults_follow_the_guide():
    config = with_preset_values(TrainingConfig())
    assert config.lora.rank == 32  # "Start with rank 32."
    assert config.optimizer.learning_rate == 1e-4  # "First attempt: 0.0001"
    assert config.sample.strengths == (0.0, 0.4, 0.7, 1.0)  # 0.7 is where the guide starts
    assert config.alpha == 32  # alpha 0 means "same as rank"


@pytest.mark.parametrize(("images", "steps"), [(10, 1000), (20, 2000), (50, 5000), (100, 8000), (3, 1000)])
def test_step_rule_is_100_per_image_within_the_guides_table(images, steps):
    assert auto_steps("none", images) == steps


@pytest.mark.parametrize(("preset", "rank", "lr", "low", "high"), [
    ("style", 16, 1e-4, 1500, 3000), ("character", 32, 1e-4, 2000, 4000),
    ("object", 32, 1e-4, 1000, 4000), ("likeness", 32, 5e-5, 3000, 5000)])
def test_presets_set_rank_lr_and_step_range(preset, rank, lr, low, high):
    config = with_preset_values(build_config({"preset": preset}))
    assert (config.lora.rank, config.optimizer.learning_rate) == (rank, lr)
    assert auto_steps(preset, 1) == low and auto_steps(preset, 1000) == high


def test_explicit_values_override_the_preset():
    config = with_preset_values(build_config({"preset": "style", "rank": 64}))
    assert config.lora.rank == 64 and config.optimizer.learning_rate == 1e-4


def test_a_preset_never_overwrites_a_value_already_set():
    """The defect: re-building a config over a base re-applied the base's preset over its values."""
    base = build_config({"preset": "style", "rank": 4, "learning_rate": 0.005})
    rebuilt = with_preset_values(build_config({"family": "sd15"}, base=base))
    assert (rebuilt.lora.rank, rebuilt.optimizer.learning_rate) == (4, 0.005)
    assert with_preset_values(rebuilt) == rebuilt


@pytest.mark.parametrize(("name", "value", "words"), [
    ("rank", -1, ["rank", "0", "256"]), ("rank", 1000, ["rank", "out of range"]),
    ("learning_rate", 50, ["learning_rate", "out of range"]), ("steps", -5, ["steps", "0", "100000"]),
    ("optimizer", "sgd", ["optimizer", "adamw", "prodigy"]), ("rank", "many", ["rank", "not a valid int"]),
    ("learning_rate", float("nan"), ["learning_rate", "finite"]), ("bucketing", "maybe", ["bucketing"])])
def test_bad_values_name_the_field_and_what_is_allowed(name, value, words):
    with pytest.raises(LoraLabError) as error:
        build_config({name: value})
    for word in words:
        assert word in str(error.value)


def test_unknown_setting_is_named():
    with pytest.raises(LoraLabError, match="Unknown setting.*rnak"):
        build_config({"rnak": 8})


def test_settings_files_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "character"\n[lora]\nrank = 48\n[sample]\nstrengths = [0.5, 1.0]\n')
    config = build_config(load_settings_file(toml))
    assert config.lora.rank == 48 and config.train.preset == "character" and config.sample.strengths == (0.5, 1.0)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"train": {"steps": 123}, "learning_rate": 3e-4}))
    config = build_config(load_settings_file(js))
    assert config.train.steps == 123 and config.optimizer.learning_rate == 3e-4
    broken = tmp_path / "broken.toml"
    broken.write_text("rank = = 3")
    with pytest.raises(LoraLabError, match="could not be read"):
        load_settings_file(broken)
    with pytest.raises(LoraLabError, match="does not exist"):
        load_settings_file(tmp_path / "missing.toml")


def test_config_round_trips_through_json():
    from lora_lab.trainer.config import config_from_dict

    config = build_config({"preset": "likeness", "rank": 12, "prompts": "a|b"})
    assert config_from_dict(json.loads(config.to_json())) == config
