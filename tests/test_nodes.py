"""The nodes without ComfyUI (stubbed): ids and input order (public API), widget defaults equal
the trainer's, each execute makes the right trainer call and wraps its result, bad input reads
well, and the stack node never changes its input."""

from __future__ import annotations

import random
import types
from pathlib import Path

import pytest
import torch
from lora_lab.trainer.config import TrainingConfig, field_specs, with_preset_values
from lora_lab.trainer.errors import LoraLabError
from safetensors.torch import save_file

# Node ids and the order of their inputs are public API: workflow files store widget values by position.
EXPECTED_INPUTS = {
    "LoraLabLoadDataset": ["folder", "lora_type", "trigger_word", "model", "images", "captions", "masks"],
    "LoraLabCaption": ["dataset", "model", "trigger_word", "template", "captioner", "replace_existing", "edits",
                       "write_txt_files"],
    "LoraLabTrainLora": ["model", "clip", "vae", "dataset", "preset", "steps", "rank", "alpha", "learning_rate",
                         "resolution", "batch_size", "optimizer", "lr_scheduler", "warmup_steps", "save_every",
                         "seed", "name", "gradient_checkpointing", "mixed_precision", "min_snr_gamma",
                         "noise_offset", "bucketing", "resume", "resume_with_changes", "sample_every", "prompts",
                         "validation_images", "background", "adapter", "lokr_factor",
                         "init_lora", "train_text_encoder", "text_encoder_lr", "prior_loss_weight", "masked_loss",
                         "mask_min_weight", "flip_augment", "color_jitter", "random_crop", "resolutions",
                         "reg_dataset"],
    "LoraLabSampleCheckpoint": ["model", "clip", "vae", "prompts", "negative", "strengths", "seed", "steps", "cfg",
                                "sampler_name", "scheduler", "width", "height", "training_run", "lora_names",
                                "checkpoints"],
    "LoraLabApplyLoraStack": ["model", "clip", "auto_strengths", "lora_1", "model_strength_1", "clip_strength_1",
                              "enabled_1", "lora_2", "model_strength_2", "clip_strength_2", "enabled_2", "lora_3",
                              "model_strength_3", "clip_strength_3", "enabled_3", "lora_stack", "training_run",
                              "checkpoint", "run_strength"],
    "LoraLabCompareLoraStack": ["model", "clip", "vae", "lora_stack", "prompts", "negative", "strengths_a",
                                "strengths_b", "seed", "steps", "cfg", "sampler_name", "scheduler", "width",
                                "height"],
}


def _schemas(nodes):
    return {node.define_schema().node_id: node.define_schema() for node in nodes.NODES}


def test_ids_are_prefixed_and_inputs_stable(nodes):
    schemas = _schemas(nodes)
    assert {node_id: [i.id for i in schema.inputs] for node_id, schema in schemas.items()} == EXPECTED_INPUTS
    for schema in schemas.values():
        assert schema.node_id.startswith("LoraLab") and schema.category == "LoRA Lab" and schema.display_name
        assert all(i.options.get("tooltip") for i in schema.inputs), schema.node_id


def test_train_widget_defaults_are_the_trainers(nodes, tmp_path):
    from lora_lab.nodes.train_lora import node_config

    schema = _schemas(nodes)["LoraLabTrainLora"]
    defaults = {i.id: i.options["default"] for i in schema.inputs if "default" in i.options}
    config = node_config(defaults, tmp_path)
    expected = TrainingConfig()
    for section in ("lora", "optimizer", "train", "data"):
        ours, theirs = getattr(config, section), getattr(expected, section)
        for name in vars(theirs):
            if name not in ("dataset", "cache_dir"):
                assert getattr(ours, name) == getattr(theirs, name), name
    for widget in schema.inputs:
        if widget.id in field_specs() and "min" in widget.options and widget.id not in ("rank", "learning_rate"):
            assert widget.options["min"] == field_specs()[widget.id][1].metadata["low"]


def test_train_node_calls_the_trainer_and_wraps_the_result(nodes, stubs, monkeypatch):
    from lora_lab.nodes import comfy_bridge, graph_model, train_lora
    from lora_lab.nodes.values import DatasetValue
    from lora_lab.trainer.data import Dataset
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import ModelIdentity
    from lora_lab.trainer.loop import Checkpoint

    calls = {}
    run_dir = stubs.loras / "lora_lab" / "mine"

    def fake_train(config, events, model, dataset, owner, graph, reg_dataset=None):
        calls.update(config=config, model=model, dataset=dataset, owner=owner, graph=graph)
        run_dir.mkdir(parents=True)
        final = run_dir / "mine.safetensors"
        save_file({"x": torch.zeros(1)}, str(final))
        return types_result(config, [Checkpoint(5, run_dir / "mine-step000005.safetensors", False),
                                     Checkpoint(10, final, True)])

    monkeypatch.setattr(train_lora, "train_lora", fake_train)
    monkeypatch.setattr(graph_model, "model_identity", lambda model, name: ModelIdentity(name, "weights"))
    def loaded_model(model, clip, vae, identity, text_encoder):
        calls["text_encoder"] = text_encoder
        return "loaded", model, identity.name

    monkeypatch.setattr(graph_model, "loaded_model", loaded_model)
    monkeypatch.setattr(comfy_bridge, "training_mode", _nullcontext)
    monkeypatch.setattr(comfy_bridge, "release_training_memory", lambda: None)
    statuses = []
    monkeypatch.setattr(comfy_bridge, "NodeEvents", lambda node, run, total: types.SimpleNamespace(
        status=lambda status, message="": statuses.append((node, run, status))))
    monkeypatch.setattr(graph_model, "family_of", lambda model: get_family("sd15"))
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "my_model.safetensors"}},
              "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors"}},
              "7": {"class_type": "LoraLabTrainLora", "inputs": {"model": ["2", 0]}}}
    workflow = {"nodes": [{"id": 7, "type": "LoraLabTrainLora"}], "links": []}
    monkeypatch.setattr(train_lora.TrainLora, "hidden", types.SimpleNamespace(
        unique_id="7", prompt=prompt, extra_pnginfo={"workflow": workflow}))
    dataset = DatasetValue(Dataset(items=[]), "folder", "f")
    schema = _schemas(nodes)["LoraLabTrainLora"]
    widgets = {i.id: i.options["default"] for i in schema.inputs if "default" in i.options}
    widgets.update(name="mine", rank=8, preset="style", steps=10)
    output = train_lora.TrainLora.execute("MODEL", "CLIP", "VAE", dataset, **widgets)
    config = calls["config"]
    assert config.lora.rank == 8 and config.optimizer.learning_rate == 0 and config.train.preset == "style"
    resolved = with_preset_values(config)  # what trains: the set rank, the preset's learning rate
    assert resolved.lora.rank == 8 and resolved.optimizer.learning_rate == 1e-4
    assert config.output.output_dir == str(stubs.loras / "lora_lab")
    assert calls["model"] == ("loaded", "MODEL", "my_model.safetensors")  # the loader's file, through the LoRA
    assert calls["text_encoder"] is False  # the graph's CLIP is only loaded for training when it trains
    from lora_lab.nodes.jobs import SERVER_SESSION

    owner = calls["owner"]
    assert (owner["node"], owner["server"]) == ("7", SERVER_SESSION)
    identity = owner["identity"]  # what a later queue recognises the run by (nodes/run_plan.py)
    assert (identity["model"], identity["model_key"], identity["dataset"]) == ("my_model.safetensors", "weights", "f")
    assert identity["settings"]["rank"] == 8 and identity["settings"]["name"] == "mine"
    assert statuses == [("7", "mine", "training"), ("7", "mine", "finished")]
    assert calls["graph"] == (workflow, prompt)  # stored in the LoRA's files (trainer/workflow.py)
    model_out, clip_out, run, curve, name = output.values
    assert model_out["lora"].endswith("mine.safetensors") and model_out["strength"] == 1.0
    assert [step for step, _ in run.checkpoints] == [5, 10] and name == "lora_lab/mine/mine.safetensors"
    assert curve.shape[-1] == 3


def test_node_runs_default_to_the_familys_resolution(nodes, tmp_path):
    from lora_lab.nodes.train_lora import node_config
    from lora_lab.trainer.data import Dataset, ImageItem
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.run import resolve_config

    dataset = Dataset(items=[ImageItem(tmp_path / "a.png", "x", 1, "", (600, 600))] * 20)
    model = types.SimpleNamespace(family=get_family("sdxl"), resolution=1024)
    config = resolve_config(node_config({"name": "n"}, tmp_path), dataset, model)
    assert config.data.resolution == 1024 and config.train.steps == 2000 and config.lora.rank == 32
    assert config.model.family == "sdxl"


def test_existing_run_names_get_a_new_suffix(nodes, tmp_path):
    from lora_lab.nodes.run_plan import unique_name

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine_2").mkdir()
    assert unique_name(tmp_path, "mine") == "mine_3" and unique_name(tmp_path, "other") == "other"


def test_family_of_the_graphs_model(nodes):
    import comfy.supported_models as models
    from lora_lab.nodes.graph_model import family_of

    def graph_model(cls, in_channels=4):
        config = cls()
        config.unet_config = {"in_channels": in_channels}
        return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))

    assert family_of(graph_model(models.SD15)).name == "sd15"
    assert family_of(graph_model(models.Segmind_Vega)).name == "sdxl"  # reduced SDXLs train as SDXL
    assert family_of(graph_model(models.Flux, 16)).name == "flux"
    assert family_of(graph_model(type("ZImage", (), {}), 16)).name == "zimage"
    with pytest.raises(LoraLabError, match=r"trains SD 1.5, SDXL, FLUX.1-dev, Z-Image \(ComfyUI 0.3.76 or later\), "
                                           r"FLUX.2 \[klein\] \(ComfyUI 0.11 or later\) models; this graph's "
                                           "model is SDXL"):
        family_of(graph_model(models.SDXL, 9))  # an inpainting model
    with pytest.raises(LoraLabError, match="this graph's model is SD3"):
        family_of(graph_model(type("SD3", (), {})))
    with pytest.raises(LoraLabError, match=r"this graph's model is Lumina2 \(ComfyUI "):  # 0.3.64 has no ZImage
        family_of(graph_model(type("Lumina2", (), {}), 16))
    flux2 = graph_model(type("Flux2", (models.Flux,), {}), 128)
    flux2.model.model_config.unet_config["image_model"] = "flux2"  # ComfyUI 0.33's FLUX.2: a subclass of Flux
    assert family_of(flux2).name == "flux2"
    flux2.model.model_config.unet_config["guidance_embed"] = True  # FLUX.2 dev: Mistral and a guidance embedding
    with pytest.raises(LoraLabError, match="this graph's model is Flux2"):
        family_of(flux2)


def test_a_lora_of_another_family_is_refused_naming_both(nodes, tmp_path, monkeypatch):
    import comfy.supported_models as models
    from lora_lab.nodes import comfy_bridge, graph_model
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.lora_files import other_family

    zimage = ["diffusion_model.layers.0.attention.to_q", "diffusion_model.layers.0.feed_forward.w2"]
    flux = ["transformer.transformer_blocks.0.attn.to_q"]
    assert other_family(zimage, get_family("flux")).name == "zimage"
    assert other_family(flux, get_family("zimage")).name == "flux"
    assert other_family(zimage, get_family("zimage")) is None
    assert other_family(["lora_unet_double_blocks_0_img_attn_qkv"], get_family("zimage")) is None  # a layout not ours
    tensors = {f"{layer}.{half}.weight": torch.zeros(2, 2) for layer in zimage for half in ("lora_A", "lora_B")}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(comfy_bridge, "load_lora_file", lambda path: tensors)
    config = models.Flux()
    config.unet_config = {"in_channels": 16}
    flux_model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))
    with pytest.raises(LoraLabError, match="x.safetensors is a Z-Image LoRA .* and this model is FLUX.1-dev: none of "
                                           "its layers would load. Pick a FLUX.1-dev LoRA"):
        graph_model.lora_for(flux_model, tmp_path / "x.safetensors")
    config = type("ZImage", (), {})()
    config.unet_config = {"in_channels": 16}
    zimage_model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))
    assert graph_model.lora_for(zimage_model, tmp_path / "x.safetensors") is tensors


def test_resume_choices_keep_the_run_and_stay_inside_the_lora_folder(nodes, tmp_path):
    from lora_lab.nodes.train_lora import node_config, resume_choices
    from lora_lab.trainer.errors import LoraLabError

    run = tmp_path / "mine"
    run.mkdir()
    (run / "mine-step000010.resume").write_bytes(b"x")
    (run / "mine-step000010.safetensors").write_bytes(b"x")
    assert resume_choices(tmp_path) == ["off", "latest", "mine/mine-step000010.resume"]
    assert node_config({"name": "mine"}, tmp_path).output.name == "mine_2"  # a new run never reuses a name
    latest = node_config({"name": "mine", "resume": "latest"}, tmp_path).output
    assert (latest.name, latest.resume) == ("mine", "latest")
    chosen = node_config({"name": "other", "resume": "mine/mine-step000010.resume"}, tmp_path).output
    assert chosen.name == "mine" and chosen.resume == str((run / "mine-step000010.resume").resolve())
    outside = tmp_path.parent / "elsewhere.resume"
    outside.write_bytes(b"x")
    for hostile in ("../elsewhere.resume", str(outside), "mine/mine-step000010.safetensors", "mine/none.resume"):
        with pytest.raises(LoraLabError, match="not a checkpoint of a run"):
            node_config({"name": "mine", "resume": hostile}, tmp_path)


def test_init_lora_lists_the_loras_folder_and_becomes_the_files_path(nodes, stubs, tmp_path):
    """init_lora's choice is a file of the loras folder (as LoraLoader lists it), handed to the
    trainer as its path; a name from a stranger's workflow that points elsewhere is refused; and a
    file replaced under the same name is another run (queue again trains it)."""
    from lora_lab.nodes.train_lora import TrainLora, identity_settings, node_config
    from lora_lab.trainer.errors import LoraLabError

    (stubs.loras / "styles").mkdir()
    start = stubs.loras / "styles" / "mine.safetensors"
    start.write_bytes(b"x")
    (widget,) = [i for i in TrainLora.define_schema().inputs if i.id == "init_lora"]
    assert widget.options["options"] == ["None", "styles/mine.safetensors"] and widget.options["default"] == "None"
    assert node_config({"name": "a", "init_lora": "styles/mine.safetensors"}, tmp_path).lora.init_lora == str(start)
    assert node_config({"name": "a", "init_lora": "None"}, tmp_path).lora.init_lora == ""
    for hostile in ("../elsewhere.safetensors", "styles/gone.safetensors"):
        with pytest.raises(LoraLabError, match="not in the loras folder"):
            node_config({"name": "a", "init_lora": hostile}, tmp_path)
    before = identity_settings({"init_lora": "styles/mine.safetensors"})
    assert before["init_lora"].startswith("styles/mine.safetensors (")
    assert identity_settings({"init_lora": "None"}) == {"init_lora": "None"}
    start.write_bytes(b"another file")
    assert identity_settings({"init_lora": "styles/mine.safetensors"}) != before


def test_the_text_encoder_trains_when_asked_or_when_init_lora_has_its_layers(nodes, stubs, tmp_path):
    """Train LoRA loads the graph's CLIP for training when train_text_encoder is on, or when the
    starting file has text-encoder layers (the file decides, as it does the rank); the panel's plan
    line says so, with its learning rate, and says before Queue what a family refuses."""
    from lora_lab.nodes.train_lora import node_config, trains_text_encoder
    from lora_lab.trainer.explain import plan_line
    from lora_lab.trainer.export import save_lora

    layer = "text_model_encoder_layers_0_self_attn_q_proj"
    save_lora(stubs.loras / "with_te.safetensors", {f"lora_te_{layer}.lora_down.weight": torch.zeros(4, 8),
                                                     f"lora_te_{layer}.lora_up.weight": torch.zeros(8, 4)}, {})
    save_lora(stubs.loras / "unet_only.safetensors", {"lora_unet_mid_block_proj_in.lora_down.weight":
                                                      torch.zeros(4, 8),
                                                      "lora_unet_mid_block_proj_in.lora_up.weight": torch.zeros(8, 4)},
              {})
    config = node_config({"name": "a", "train_text_encoder": True}, tmp_path)
    assert trains_text_encoder(config)
    assert trains_text_encoder(node_config({"name": "a", "init_lora": "with_te.safetensors"}, tmp_path))
    assert not trains_text_encoder(node_config({"name": "a", "init_lora": "unet_only.safetensors"}, tmp_path))
    assert not trains_text_encoder(node_config({"name": "a"}, tmp_path))
    line = plan_line({"train_text_encoder": True, "preset": "style"}, "sd15", 12)
    assert "the text encoder trains too, at learning rate 5e-5 (half the learning rate)" in line
    assert "at learning rate 2e-5;" in plan_line({"train_text_encoder": True, "text_encoder_lr": 2e-5}, "sdxl", 12)
    assert plan_line({"train_text_encoder": True}, "flux", 12).startswith("train_text_encoder do(es) not apply to "
                                                                          "FLUX.1")
    assert plan_line({"text_encoder_lr": 2e-5}, "sd15", 12) == (
        "text_encoder_lr = 2e-05 applies only while the text encoder trains; turn train_text_encoder on, or set "
        "text_encoder_lr to 0.")


def test_stack_applies_in_order_without_touching_its_input(nodes, stubs):
    from lora_lab.nodes.apply_lora_stack import ApplyLoraStack
    from lora_lab.trainer.export import save_lora

    for name, words in (("a.safetensors", '["aaa"]'), ("b.safetensors", '["bbb"]')):
        save_lora(stubs.loras / name, {"x": torch.zeros(1)}, {"lora_lab.trigger_words": words})
    incoming = [("a.safetensors", 1.0, 0.5)]
    slots = {"lora_1": "b.safetensors", "model_strength_1": 0.9, "clip_strength_1": 0.8, "enabled_1": True,
             "lora_2": "None", "model_strength_2": 0.5, "clip_strength_2": 0.5, "enabled_2": True,
             "lora_3": "a.safetensors", "model_strength_3": 0.5, "clip_strength_3": 0.5, "enabled_3": False}
    output = ApplyLoraStack.execute("MODEL", "CLIP", False, lora_stack=incoming, **slots)
    model, clip, stack, words = output.values
    assert incoming == [("a.safetensors", 1.0, 0.5)]  # unchanged
    assert stack == [("a.safetensors", 1.0, 0.5), ("b.safetensors", 0.9, 0.8)] and words == "aaa, bbb"
    assert [(a[0].rsplit("/", 1)[1], a[1], a[2]) for a in stubs.applied] == [("a.safetensors", 1.0, 0.5),
                                                                             ("b.safetensors", 0.9, 0.8)]
    auto = ApplyLoraStack.execute("MODEL", "CLIP", True, lora_stack=incoming, **slots).values[2]
    assert [(s[1], s[2]) for s in auto] == [(0.7, 0.7), (0.5, 0.5)]  # the guide's stacking rule
    # Each slot's type is its list of files, so the server checks a queued name against it and blames
    # that slot alone (a stranger's workflow may name files this machine lacks).
    slot_types = {i.id: i.get_io_type() for i in ApplyLoraStack.define_schema().inputs
                  if i.id in ("lora_1", "lora_2", "lora_3")}
    assert slot_types == {f"lora_{n}": ["None", "a.safetensors", "b.safetensors"] for n in (1, 2, 3)}
    with pytest.raises(LoraLabError, match="'missing.safetensors' is not in the loras folder"):
        ApplyLoraStack.execute("MODEL", "CLIP", False, **{**slots, "lora_1": "missing.safetensors"})
    with pytest.raises(LoraLabError, match="LORA_STACK list"):
        ApplyLoraStack.execute("MODEL", "CLIP", False, lora_stack="junk", **slots)


def chain_of(patched) -> list[tuple[str, float]]:
    """The LoRAs a stubbed patched model holds, first applied first: (file stem, strength)."""
    chain = []
    while isinstance(patched, dict):
        chain.insert(0, (Path(patched["lora"]).stem, patched["strength"]))
        patched = patched["base"]
    return chain


def test_compare_lora_stack_samples_each_pair_of_strengths_chained_in_stack_order(nodes, stubs, monkeypatch):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.nodes.compare_lora_stack import CompareLoraStack
    from lora_lab.trainer.export import save_lora

    for name, words in (("a", '["aaa"]'), ("b", '["bbb"]'), ("c", '["ccc"]')):
        save_lora(stubs.loras / f"{name}.safetensors", {"x": torch.zeros(1)}, {"lora_lab.trigger_words": words})
    sampled, events = [], []
    monkeypatch.setattr(comfy_bridge, "encode_text", lambda clip, text: [text])
    monkeypatch.setattr(comfy_bridge, "is_guidance_distilled", lambda model: False)
    monkeypatch.setattr(comfy_bridge, "sample_image", lambda model, vae, positive, negative, *rest: sampled.append(
        (chain_of(model), positive[0], negative[0])) or torch.full((1, 8, 8, 3), len(sampled) / 100))
    monkeypatch.setattr(comfy_bridge, "send", lambda event, data: events.append(data))
    settings = dict(prompts="{trigger}, a cat", negative="ugly", seed=1, steps=2, cfg=5.0, sampler_name="euler",
                    scheduler="normal", width=64, height=64)
    stack = [("a.safetensors", 0.7, 0.7), ("b.safetensors", 0.5, 0.5), ("c.safetensors", 0.35, 0.3)]
    output = CompareLoraStack.execute("MODEL", "CLIP", "VAE", stack, strengths_a="0, 0.7", strengths_b="0, 0.5",
                                      **settings)
    grid, cells = output.values
    with_c = [("c", 0.35)]
    # Every cell chains a, b, then c, as LoraLoader after LoraLoader; strength 0 applies nothing. The
    # last row, c off and b at 0, holds the base and a alone.
    assert [chain for chain, _, _ in sampled] == [with_c, [("a", 0.7), *with_c], [("b", 0.5), *with_c],
                                                  [("a", 0.7), ("b", 0.5), *with_c], [], [("a", 0.7)]]
    assert {text for _, text, _ in sampled} == {"aaa, bbb, ccc, a cat"} and {n for _, _, n in sampled} == {"ugly"}
    assert stubs.applied[-1] == (str(stubs.loras / "a.safetensors"), 0.7, 0.7)  # model and clip at the axis value
    assert cells.shape[0] == 6 and [event["done"] for event in events] == list(range(1, 7))
    assert events[-1]["label"] == "a 0.7 + b off · aaa, bbb, ccc, a cat"
    shown = output.ui["lora_lab_grid"][0]
    assert shown["columns"] == ["a off", "a 0.7"] and shown["corner"] == "under every cell but the last row: c 0.35"
    assert [row["label"] for row in shown["rows"]] == ["b off\n+ c 0.35", "b 0.5\n+ c 0.35", "b off\nc off"]
    assert grid.shape[0] == 1 and grid.shape[1] > 3 * 250  # three rows of 256 px cells

    sampled.clear()
    two = CompareLoraStack.execute("MODEL", "CLIP", "VAE", stack[:2], strengths_a="0, 1", strengths_b="0, 1",
                                   **{**settings, "prompts": "x\ny"})
    assert len(sampled) == 8 and [row["label"] for row in two.ui["lora_lab_grid"][0]["rows"]] == [
        "b off\nx", "b 1\nx", "b off\ny", "b 1\ny"]  # no third: the corner cell is the base
    with pytest.raises(LoraLabError, match="holds 1 LoRA; Compare LoRA Stack needs two"):
        CompareLoraStack.execute("MODEL", "CLIP", "VAE", stack[:1], strengths_a="0", strengths_b="0", **settings)
    with pytest.raises(LoraLabError, match="connect Apply LoRA Stack's lora_stack output"):
        CompareLoraStack.execute("MODEL", "CLIP", "VAE", "junk", strengths_a="0", strengths_b="0", **settings)
    with pytest.raises(LoraLabError, match="e.g. 0, 0.4, 0.5, 0.6"):
        CompareLoraStack.execute("MODEL", "CLIP", "VAE", stack, strengths_a="0", strengths_b="half", **settings)


def test_a_setting_added_later_leaves_the_identity_of_older_runs_alone(nodes):
    """Queue again finds a finished run by its settings' digest: a run trained before `adapter`
    existed must keep its digest while adapter keeps the old behaviour (lora)."""
    from lora_lab.nodes.train_lora import SETTINGS, SETTINGS_AFTER_BACKGROUND, node_inputs_as_settings

    old = {name: f"value of {name}" for name in SETTINGS}
    later = {"adapter": "lora", "lokr_factor": -1, "init_lora": "None", "train_text_encoder": False,
             "text_encoder_lr": 0.0, "prior_loss_weight": 1.0, "masked_loss": False, "mask_min_weight": 0.0,
             "flip_augment": False, "color_jitter": 0.0, "random_crop": False, "resolutions": ""}
    assert set(later) == set(SETTINGS_AFTER_BACKGROUND)
    assert node_inputs_as_settings({**old, **later}) == old
    assert node_inputs_as_settings({**old, **later, "adapter": "loha"}) == {**old, "adapter": "loha"}
    assert node_inputs_as_settings({**old, **later, "train_text_encoder": True}) == {**old, "train_text_encoder": True}


def test_load_dataset_reports_and_carries_the_lora_type(nodes, stubs, monkeypatch):
    from lora_lab.nodes import graph_model
    from lora_lab.nodes.load_dataset import NO_MODEL_NOTE, LoadDataset
    from lora_lab.nodes.train_lora import node_config
    from lora_lab.trainer import embedded
    from lora_lab.trainer.families import get_family

    folder = str(embedded.CONCEPT_DATASET)
    output = LoadDataset.execute(folder, "character", "")
    dataset, report = output.values
    assert len(dataset.dataset.items) == 12 and report.startswith("Ready to train, with")
    assert "12 images: a character LoRA needs at least 15" in report and "far too small, under 128 px" in report
    assert report.endswith(NO_MODEL_NOTE) and dataset.family == ""
    assert dataset.report.of("tiny") and output.ui["text"] == (report,)
    assert output.ui["lora_lab_dataset"] == [{"images": 12, "lora_type": "character", "family": "",
                                             "trigger": "zkw_toy"}]  # for Train LoRA's plan line
    assert output.ui["images"].shape[0] == 1  # the sheet of flagged images, on the node
    assert dataset.lora_type == "character"
    config = node_config({"preset": "from dataset"}, stubs.loras, dataset.lora_type)
    assert config.train.preset == "character"  # chosen once, on Load Dataset
    assert node_config({"preset": "likeness"}, stubs.loras, dataset.lora_type).train.preset == "likeness"
    monkeypatch.setattr(graph_model, "family_of", lambda model: get_family("flux"))
    dataset, report = LoadDataset.execute(folder, "style", "", model="MODEL").values
    assert dataset.family == "flux" and NO_MODEL_NOTE not in report
    assert "1024 is this model's size" in report  # checked against the connected model's family
    with pytest.raises(LoraLabError, match="needs a folder or an images input"):
        LoadDataset.execute("", "style", "")
    for hostile in ("../../etc", "../outside"):  # a stranger's workflow may not climb out of input/
        with pytest.raises(LoraLabError, match="points outside ComfyUI's input folder"):
            LoadDataset.execute(hostile, "style", "")


def test_sample_checkpoint_rejects_bad_strengths(nodes):
    from lora_lab.nodes.sample_checkpoint import checkpoints_to_sample, parse_strengths

    assert parse_strengths("0, 0.4, 0.7, 1.0") == [0, 0.4, 0.7, 1.0]
    with pytest.raises(LoraLabError, match="numbers separated by commas"):
        parse_strengths("strong")
    with pytest.raises(LoraLabError, match="Nothing to sample"):
        checkpoints_to_sample(None, "")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def types_result(config, checkpoints):
    from lora_lab.trainer.run import TrainingResult

    return TrainingResult(config=config, run_dir=checkpoints[-1].path.parent, checkpoints=checkpoints,
                          losses=[(1, 0.5, 1e-4), (2, 0.4, 1e-4)], stopped=False, trigger_words=("mine",),
                          seconds=1.0, loop_seconds=1.0, model=None)


def test_load_dataset_fingerprint_follows_the_folder(nodes, tmp_path):
    """ComfyUI re-runs Load Dataset only when its fingerprint changes: it must change with every
    image or caption change, and only then."""
    import os
    import shutil

    from lora_lab.nodes.load_dataset import LoadDataset
    from lora_lab.trainer import embedded

    folder = tmp_path / "set"
    shutil.copytree(embedded.CONCEPT_DATASET, folder)
    seen = [LoadDataset.fingerprint_inputs(folder=str(folder))]
    assert LoadDataset.fingerprint_inputs(folder=str(folder)) == seen[0]  # nothing changed: no re-run
    caption = next(folder.rglob("*.txt"))
    caption.write_text("zkw_toy, another caption\n")
    os.utime(caption, ns=(1, 1))  # even with an old time stamp, the size changed
    seen.append(LoadDataset.fingerprint_inputs(folder=str(folder)))
    shutil.copy(next(folder.rglob("*.png")), caption.parent / "new.png")
    seen.append(LoadDataset.fingerprint_inputs(folder=str(folder)))
    (caption.parent / "new.png").unlink()
    (folder / "notes.md").write_text("not part of the dataset")
    seen.append(LoadDataset.fingerprint_inputs(folder=str(folder)))
    assert len(set(seen[:3])) == 3 and seen[3] == seen[1]


def test_graph_model_key_follows_the_weights(nodes, base_model):
    """Cached encodings are filed under the model's key: two checkpoints never share them."""
    import copy

    from lora_lab.nodes.graph_model import weights_key

    denoiser = copy.deepcopy(base_model.denoiser)
    key = weights_key(denoiser)
    assert weights_key(denoiser) == key
    with torch.no_grad():
        denoiser.conv_in.weight[0, 0, 0, 0] += 0.5  # a fine-tune changes weights, not names or shapes
    assert weights_key(denoiser) != key


def test_run_route_reads_a_runs_history_by_name_or_node(nodes, make_config, fresh_model, tmp_path):
    """What a reloaded page or a second browser gets: the whole curve and the run's state."""
    from lora_lab.nodes.routes import run_route
    from lora_lab.trainer.run import train_lora

    folder = tmp_path / "out"
    train_lora(make_config(steps=3, name="first"), model=fresh_model, owner={"node": "5:3"})
    status, answer = run_route({"node": "5:3"}, folder)
    assert status == 200 and answer["run"]["name"] == "first" and answer["run"]["status"] == "finished"
    assert [row[0] for row in answer["losses"]] == [1, 2, 3] and answer["run"]["owner"] == {"node": "5:3"}
    assert answer["sample"].startswith("data:image/jpeg;base64,")  # the newest sample sheet, for the panel
    assert run_route({"name": "first"}, folder) == (status, answer)
    assert run_route({"node": "9"}, folder) == (200, {"run": None, "losses": [], "sample": None, "job": None})
    assert run_route({"name": "nope"}, folder)[0] == 404
    for hostile in ("../out", "..", "/etc", ".hidden"):  # only run folders inside the LoRA Lab folder
        assert run_route({"name": hostile}, folder)[0] in (400, 404)
    assert run_route({}, folder)[0] == 400


def test_sample_checkpoint_samples_strength_zero_once_per_prompt_and_reports_each_cell(nodes, stubs, monkeypatch):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.nodes.sample_checkpoint import SampleCheckpoint
    from lora_lab.nodes.values import TrainingRun

    sampled, progress, events = [], [], []
    monkeypatch.setattr(comfy_bridge, "load_lora_file", lambda path: {"file": str(path)})
    monkeypatch.setattr(comfy_bridge, "encode_text", lambda clip, text: ("encoded", text))
    monkeypatch.setattr(comfy_bridge, "is_guidance_distilled", lambda model: False)
    monkeypatch.setattr(comfy_bridge, "sample_image", lambda model, vae, positive, negative, *rest: sampled.append(
        (model, positive[1])) or torch.full((1, 8, 8, 3), len(sampled) / 10))
    monkeypatch.setattr(comfy_bridge, "NodeProgress", lambda node, total: types.SimpleNamespace(
        update=lambda done: progress.append((done, total))))
    monkeypatch.setattr(comfy_bridge, "send", lambda event, data: events.append((event, data)))
    run = TrainingRun("mine", ((5, stubs.loras / "a.safetensors"), (10, stubs.loras / "b.safetensors")), ("zkw",))
    output = SampleCheckpoint.execute("MODEL", "CLIP", "VAE", prompts="{trigger}, a\n{trigger}, b", negative="",
                                      strengths="0, 0.5, 1", seed=1, steps=2, cfg=5.0, sampler_name="euler",
                                      scheduler="normal", width=64, height=64, training_run=run)
    grid, cells = output.values
    # 2 checkpoints x 2 prompts x 3 strengths = 12 cells, but strength 0 is the base model: 2 + 8 sampled.
    assert len(sampled) == 10 and cells.shape[0] == 12
    assert [m for m, _ in sampled].count("MODEL") == 2  # the unpatched model, once per prompt
    assert progress == [(k, 10) for k in range(1, 11)]
    assert [data["done"] for event, data in events if event == "lora_lab.cell"] == list(range(1, 11))
    assert events[-1][1]["image"].startswith("data:image/jpeg;base64,")
    assert grid.shape[0] == 1 and grid.shape[2] > 240 + 3 * 250  # label column and three cells of 256 px
    # On the node: the cells and their labels as text, row by row (web/lora_lab.js lays them out).
    shown = output.ui["lora_lab_grid"][0]
    assert shown["columns"] == ["strength 0", "strength 0.5", "strength 1"]
    assert [row["label"] for row in shown["rows"]] == ["step 5\nzkw, a", "step 5\nzkw, b", "step 10\nzkw, a",
                                                       "step 10\nzkw, b"]
    assert all(len(row["cells"]) == 3 for row in shown["rows"])


def test_sample_checkpoint_encodes_each_text_once_per_text_encoder_state(nodes, stubs, monkeypatch):
    """A LoRA that adds no text-encoder patches (FLUX's) reuses the base's encodings; one that does
    is encoded anew at each checkpoint and strength; FLUX.1-dev's negative is never encoded."""
    from lora_lab.nodes import comfy_bridge
    from lora_lab.nodes.sample_checkpoint import SampleCheckpoint
    from lora_lab.nodes.values import TrainingRun

    def clip_with(patches: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(patcher=types.SimpleNamespace(patches={"layer": [()] * patches}))

    for text_patches, distilled, expected in ((0, True, 2), (0, False, 3), (1, True, 2 + 2 * 2 * 2)):
        encoded, negatives = [], []
        base_clip = clip_with(0)
        monkeypatch.setattr(comfy_bridge, "NodeProgress", lambda node, total: types.SimpleNamespace(
            update=lambda done: None))
        monkeypatch.setattr(comfy_bridge, "send", lambda event, data: None)
        monkeypatch.setattr(comfy_bridge, "apply_lora", lambda model, clip, lora, ms, cs, n=text_patches: (
            model, clip_with(n) if cs else clip))
        monkeypatch.setattr(comfy_bridge, "load_lora_file", lambda path: {"file": str(path)})
        monkeypatch.setattr(comfy_bridge, "is_guidance_distilled", lambda model, d=distilled: d)
        monkeypatch.setattr(comfy_bridge, "encode_text", lambda clip, text, e=encoded: e.append(text) or [text])
        monkeypatch.setattr(comfy_bridge, "sample_image", lambda model, vae, positive, negative, *rest,
                            n=negatives: (n.append(negative), torch.zeros((1, 8, 8, 3)))[1])
        run = TrainingRun("mine", ((5, stubs.loras / "a.safetensors"), (10, stubs.loras / "b.safetensors")), ("zkw",))
        SampleCheckpoint.execute("MODEL", base_clip, "VAE", prompts="{trigger}, a\n{trigger}, b", negative="ugly",
                                 strengths="0, 0.5, 1", seed=1, steps=2, cfg=3.5, sampler_name="euler",
                                 scheduler="normal", width=64, height=64, training_run=run)
        assert len(encoded) == expected, (text_patches, distilled, encoded)
        assert all(n is None for n in negatives) if distilled else all(n == ["ugly"] for n in negatives)


def test_the_run_routes_stay_in_their_folder_and_answer_briefly(nodes, make_config, fresh_model, tmp_path):
    """Links out of the LoRA Lab folder are never followed; error replies cut what they echo and name
    no absolute folder."""
    import os

    from lora_lab.nodes.routes import run_route, stop_route
    from lora_lab.trainer.run import train_lora

    folder = tmp_path / "out"
    train_lora(make_config(steps=2, name="mine", sample_every=-1), model=fresh_model, owner={"node": "3"})
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "theirs").mkdir(parents=True)
    (elsewhere / "theirs" / "theirs-run.json").write_text((folder / "mine" / "mine-run.json").read_text().replace(
        '"mine"', '"theirs"'))
    (folder / "theirs").symlink_to(elsewhere / "theirs", target_is_directory=True)  # a run folder that is a link
    assert run_route({"name": "theirs"}, folder)[0] == 404
    secret = tmp_path / "secret.csv"
    secret.write_text("step,loss,lr,val_loss\n1,0.123456,0.1,\n")
    os.replace(folder / "mine" / "mine-loss.csv", tmp_path / "kept.csv")
    (folder / "mine" / "mine-loss.csv").symlink_to(secret)  # a loss log that is a link out
    status, answer = run_route({"name": "mine"}, folder)
    assert status == 200 and answer["losses"] == []
    status, answer = run_route({"name": "x" * 5_000_000}, folder)
    assert status == 400 and len(str(answer)) < 200
    status, answer = stop_route({"name": "y" * 5_000_000})
    assert status == 404 and len(str(answer)) < 200
    status, answer = run_route({"name": "nope"}, folder)
    assert status == 404 and str(tmp_path) not in answer["error"]


def test_a_server_open_to_the_network_reads_datasets_only_from_allowed_folders(nodes, stubs, monkeypatch, tmp_path):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.nodes.folders import resolve_dataset_folder

    outside = tmp_path / "anywhere"
    outside.mkdir()
    assert resolve_dataset_folder(str(outside)) == outside  # this machine only: the user's own folders
    monkeypatch.setattr(comfy_bridge, "server_is_local", lambda: False)  # started with --listen 0.0.0.0
    with pytest.raises(LoraLabError, match="reads datasets only from the input folder.*LORA_LAB_DATASET_FOLDERS"):
        resolve_dataset_folder(str(outside))
    (tmp_path / "input" / "mine").mkdir()
    assert resolve_dataset_folder("mine") == (tmp_path / "input" / "mine").resolve()
    monkeypatch.setenv("LORA_LAB_DATASET_FOLDERS", str(outside))
    assert resolve_dataset_folder(str(outside / ".")) == outside / "."


def test_server_listening_beyond_loopback_is_told_apart(nodes, monkeypatch):
    import sys
    import types

    from lora_lab.nodes import comfy_bridge

    for listen, local in (("127.0.0.1", True), ("127.0.0.1,::1", True), ("0.0.0.0", False),
                          ("192.168.1.5", False), ("::", False), ("localhost", True)):
        monkeypatch.setitem(sys.modules, "comfy.cli_args", types.SimpleNamespace(args=types.SimpleNamespace(
            listen=listen)))
        assert comfy_bridge.server_is_local() is local, listen


def test_load_dataset_checks_regularisation_images_and_takes_masks(nodes, stubs, tmp_path):
    from lora_lab.nodes.load_dataset import LoadDataset
    from lora_lab.nodes.train_lora import TrainLora, check_datasets, identity_settings
    from lora_lab.trainer import embedded
    from lora_lab.trainer.embedded import synthetic

    folder = tmp_path / "class"
    folder.mkdir()
    rng = random.Random(2)
    for index in range(3):
        image, caption = synthetic.base_sample(rng)
        image.save(folder / f"c{index}.png")
        (folder / f"c{index}.txt").write_text(caption if index else "zkw_toy, " + caption)
    reg, report = LoadDataset.execute(str(folder), "regularisation", "zkw_toy").values
    assert reg.purpose == "regularisation" and report.startswith("Regularisation images (3)")
    assert "1 regularisation caption(s) contain the trigger word 'zkw_toy' (c0.png)" in report
    assert "3 regularisation images: use at least 10" in report
    training, _ = LoadDataset.execute(str(embedded.CONCEPT_DATASET), "style", "").values
    with pytest.raises(LoraLabError, match="connect them to reg_dataset"):
        TrainLora.execute("MODEL", "CLIP", "VAE", reg)
    with pytest.raises(LoraLabError, match="is the training dataset itself"):
        check_datasets(training, training)
    assert identity_settings({"rank": 8}) == {"rank": 8}  # without reg images: the identity runs had before
    assert identity_settings({"rank": 8}, reg) == {"rank": 8, "reg_dataset": reg.fingerprint}
    # The images path takes a MASK (one per image, or one for all), 1 = counts.
    images = torch.rand(2, 64, 64, 3)
    masks = torch.zeros(1, 64, 64)
    masks[:, 8:40, 8:40] = 1.0
    masked, text = LoadDataset.execute("", "style", "zkw_toy", images=images, captions="zkw_toy a\nzkw_toy b",
                                       masks=masks).values
    assert [item.mask_source for item in masked.dataset.items] == ["graph", "graph"]
    assert "2 of 2 images have masks (from the graph's MASK)" in text
    unmasked, _ = LoadDataset.execute("", "style", "zkw_toy", images=images, captions="zkw_toy a\nzkw_toy b").values
    assert unmasked.fingerprint != masked.fingerprint
    with pytest.raises(LoraLabError, match="masks input goes with the images input"):
        LoadDataset.execute(str(embedded.CONCEPT_DATASET), "style", "", masks=masks)
