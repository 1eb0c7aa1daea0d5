"""LoRA files: kohya names, the true alpha, strictness, atomic writes, and careful reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_lab.trainer import export
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.export import load_into_model, lora_state_dict, save_lora
from lora_lab.trainer.lora import ADAPTER, add_lora, lora_layers, set_strength
from lora_lab.trainer.run import prepare_run_dir
from safetensors.torch import load_file, save_file


@pytest.fixture
def lora_model(fresh_model):
    add_lora(fresh_model, rank=4, alpha=2.0, targets="attention", train_text_encoder=True)
    torch.manual_seed(0)
    for _, module in fresh_model.lora_modules():
        for _, layer in lora_layers(module):
            torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=0.01)
    return fresh_model


def test_kohya_names_and_true_alpha(lora_model):
    tensors = lora_state_dict(lora_model)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 128)
    assert tensors[f"{name}.lora_up.weight"].shape == (128, 4)
    assert float(tensors[f"{name}.alpha"]) == 2.0  # never silently rank
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    layers = sum(len(lora_layers(m)) for _, m in lora_model.lora_modules())
    assert len(tensors) == 3 * layers


def test_unnameable_layer_raises_before_writing(tmp_path, lora_model, monkeypatch):
    family = lora_model.family
    with pytest.raises(LoraLabError, match="Cannot name LoRA layer"):
        family.layer_name("lora_unet", "blocks.0.weird-name")
    original = type(family).export_path
    monkeypatch.setattr(type(family), "export_path", lambda self, p, m: original(self, p, m.replace("attn1", "attn-1")))
    with pytest.raises(LoraLabError, match="nothing was written"):
        lora_state_dict(lora_model)


def test_save_is_atomic(tmp_path, lora_model, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(lora_model), {"note": "first"})
    good = load_file(str(path))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, lora_state_dict(lora_model), {"note": "second"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]  # no temporary left behind
    assert load_file(str(path)).keys() == good.keys()  # the previous file is intact
    with pytest.raises(TypeError, match="strings"):
        save_lora(path, {}, {"steps": 3})


def test_reading_back_restores_weights_and_alpha(tmp_path, lora_model, fresh_model):
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(lora_model, dtype=torch.float32), {})
    add_lora(fresh_model, rank=4, alpha=4.0, targets="attention", train_text_encoder=True)
    load_into_model(fresh_model, path)
    ours = dict(lora_layers(lora_model.denoiser))
    for name, layer in lora_layers(fresh_model.denoiser):
        assert torch.equal(layer.lora_B[ADAPTER].weight, ours[name].lora_B[ADAPTER].weight)
        assert layer.scaling[ADAPTER] == pytest.approx(0.5)  # alpha 2 / rank 4, from the file
    set_strength(fresh_model, 0.5)
    assert all(layer.scaling[ADAPTER] == pytest.approx(0.25) for _, layer in lora_layers(fresh_model.denoiser))


def test_reading_a_mismatched_file_is_refused(tmp_path, lora_model, fresh_model):
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(lora_model), {})
    add_lora(fresh_model, rank=8, alpha=8.0, targets="attention", train_text_encoder=True)
    with pytest.raises(LoraLabError, match="another rank, factor or base model"):
        load_into_model(fresh_model, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraLabError, match="junk.safetensors is not a usable LoRA file"):
        load_into_model(fresh_model, junk)
    extra = tmp_path / "extra.safetensors"
    tensors = lora_state_dict(lora_model)
    save_file({**tensors, "lora_unet_mystery.lora_down.weight": torch.zeros(1, 4),
               "lora_unet_mystery.lora_up.weight": torch.zeros(4, 1)}, str(extra))
    with pytest.raises(LoraLabError, match="tensors this model.s adapter lacks.*lora_unet_mystery"):
        load_into_model(fresh_model, extra)


def test_existing_run_is_never_overwritten_silently(make_config):
    config = make_config(name="mine")
    run_dir = prepare_run_dir(config)
    (run_dir / "mine.safetensors").write_bytes(b"precious")
    with pytest.raises(LoraLabError, match="already exists.*another name, set resume to 'latest'.*or set overwrite"):
        prepare_run_dir(config)
    assert (run_dir / "mine.safetensors").read_bytes() == b"precious"
    prepare_run_dir(make_config(name="mine", overwrite=True))
    assert not (run_dir / "mine.safetensors").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "C:evil", "", "x" * 200, "..", "CON", "nul.txt", " lead",
                                  "trail.", "-flag", "tab\tname", ".hidden", "a\\b"])
def test_output_names_must_be_plain(make_config, name):
    with pytest.raises(LoraLabError, match="not a plain file name"):
        prepare_run_dir(make_config(name=name))


def test_shared_metadata_names_no_local_folders(make_config, fresh_model, tmp_path):
    """A LoRA shared with strangers tells what was trained, not where the trainer keeps things."""
    import json
    import shutil

    from lora_lab.trainer import embedded
    from lora_lab.trainer.files import read_metadata
    from lora_lab.trainer.run import train_lora

    dataset = tmp_path / "private" / "alice" / "my_set"
    shutil.copytree(embedded.CONCEPT_DATASET, dataset)
    config = make_config(steps=1, dataset=str(dataset), base_model=str(embedded.TINY_MODEL),
                         cache_dir=str(tmp_path / "private" / "cache"))
    metadata = read_metadata(train_lora(config, model=fresh_model).final_path)
    assert "private" not in json.dumps(metadata) and str(tmp_path) not in json.dumps(metadata)
    saved = json.loads(metadata["lora_lab.config"])
    assert (saved["data"]["dataset"], saved["model"]["base_model"], saved["data"]["cache_dir"]) == (
        "my_set", "tiny-sd15", "cache")
    assert metadata["ss_sd_model_name"] == "tiny-sd15"


def test_the_story_reads_as_english_and_a_cancelled_checkpoint_has_a_picture():
    from lora_lab.trainer.config import build_config, with_preset_values
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.loop import SampleSheet
    from lora_lab.trainer.metadata import CheckpointStory, RunFacts, story
    from lora_lab.trainer.watch import RunWatch
    from PIL import Image

    facts = RunFacts(get_family("sd15"), "m", 512, 250, 10, ("xyz",), {}, "f", "epsilon", 0.0)
    for preset, article in (("object", "An object"), ("style", "A style"), ("none", "A LoRA")):
        config = with_preset_values(build_config({"preset": preset}))
        assert story(config, facts, 100, CheckpointStory())["modelspec.description"].startswith(article)
    # Cancel at step 61: no sample of its own, so the newest one before it is its thumbnail.
    watch = RunWatch(Path("."), "run", 250, None, None, 0, None, -1)
    assert watch.thumbnail_at(61) is None
    picture = Image.new("RGB", (8, 8), "red")
    watch.latest_sheet = SampleSheet(50, Path("x.png"), [picture])
    assert watch.thumbnail_at(61) is picture and watch.thumbnail_at(40) is None
