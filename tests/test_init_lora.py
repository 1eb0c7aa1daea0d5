"""Continue from an existing adapter file (init_lora, trainer/init_lora.py): a file saved by
diffusers' own save_lora_weights starts the run exactly where diffusers' own loading puts the
model; the file's type, rank, alpha and factor become the run's; conflicting settings and files
that do not fit are refused with what they are; a run from a file resumes exactly; ComfyUI's
layout (flattened convolution halves, full weight differences) means what ComfyUI makes of it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lora_lab.trainer import embedded
from lora_lab.trainer.config import build_config
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.files import read_metadata
from lora_lab.trainer.history import journal_path, read_journal
from lora_lab.trainer.init_lora import apply_starting_weights, read_starting_adapter, starting_values
from lora_lab.trainer.lora import ADAPTER, add_lora, lora_layers
from lora_lab.trainer.run import train_lora
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .test_resume import StopAt

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
QUICK = {"steps": 3, "sample_every": -1, "validation_images": -1, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def diffusers_file(tmp_path_factory):
    """A LoRA saved by diffusers' own save_lora_weights (UNet attention and text-encoder q/v, two
    alphas), with random weights so that it changes the model."""
    torch.manual_seed(3)
    pipe = StableDiffusionPipeline.from_pretrained(str(embedded.TINY_MODEL))
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # transformers 5's add_adapter refuses current peft
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero; a trained file's is not
                    parameter.normal_(std=0.2)
    folder = tmp_path_factory.mktemp("diffusers_lora")
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def started(model, path):
    """The model as a run from `path` holds it at step 0."""
    start = read_starting_adapter(path, model)
    config = build_config({"family": "sd15", **starting_values(build_config({}), start, model)})
    lora = config.lora
    add_lora(model, lora.rank, config.alpha, lora.targets, lora.train_text_encoder, lora.adapter,
             modules=start.modules, **lora.adapter_options(), **start.hints)
    apply_starting_weights(model, start)
    return start, config


def test_a_diffusers_file_starts_the_run_where_diffusers_puts_the_model(diffusers_file, base_model):
    """Oracle: diffusers' own load_lora_weights of its own file. Our step-0 UNet and text encoder
    give its outputs, layer for layer."""
    ours, base = copy.deepcopy(base_model), copy.deepcopy(base_model)
    for model in (ours, base):  # compared in fp32, as diffusers loads the model
        model.denoiser.float()
        model.text_encoders[0].float()
    start, config = started(ours, diffusers_file)
    assert (start.layout, start.adapter, start.rank) == ("diffusers", "lora", 4)
    assert config.lora.train_text_encoder and config.lora.targets == "attention" and config.alpha == 2.0
    pipe = StableDiffusionPipeline.from_pretrained(str(embedded.TINY_MODEL)).to(dtype=torch.float32)
    pipe.load_lora_weights(str(diffusers_file))
    torch.manual_seed(0)
    latents = torch.randn(2, ours.denoiser.config.in_channels, 8, 8)
    tokens = torch.randint(0, pipe.text_encoder.config.vocab_size, (2, 16))
    with torch.no_grad():
        context = pipe.text_encoder(tokens)[0]
        assert (context - base.text_encoders[0](tokens)[0]).abs().max() > 1e-3
        assert torch.allclose(ours.text_encoders[0](tokens)[0], context, atol=1e-5)
        expected = pipe.unet(latents, 500, encoder_hidden_states=context).sample
        got = ours.denoiser(latents, 500, encoder_hidden_states=context).sample
        unchanged = base.denoiser(latents, 500, encoder_hidden_states=context).sample
    assert (expected - unchanged).abs().max() > 1e-3  # the file changes the model ...
    assert torch.allclose(got, expected, atol=1e-5)  # ... and ours changes it as diffusers does


def test_a_run_from_a_file_starts_from_its_weights_and_says_so(diffusers_file, base_model, make_config):
    result = train_lora(make_config(init_lora=str(diffusers_file), name="again", **QUICK),
                        model=copy.deepcopy(base_model))
    steps = [c.step for c in result.checkpoints]
    assert steps == [0, 1, 2, 3] and result.best.step == 3  # step 0 is the file; never recommended
    source, first = load_file(str(diffusers_file)), load_file(str(result.checkpoints[0].path))
    down = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    source_down = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert torch.equal(first[down], source[source_down])
    assert torch.equal(first[text], source["text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"])
    assert float(first[down.replace("lora_down.weight", "alpha")]) == 2.0
    assert float(first[text.replace("lora_up.weight", "alpha")]) == 8.0  # each layer keeps its own alpha
    last = load_file(str(result.final_path))
    moved = (last[down].float() - first[down]).norm()
    assert 0 < moved < 0.2 * first[down].norm()  # trained on from the file's weights, not from zero
    metadata = read_metadata(result.final_path)
    assert metadata["lora_lab.init_lora"] == diffusers_file.name and len(metadata["lora_lab.init_lora_sha256"]) == 64
    assert metadata["ss_network_dim"] == "4" and json.loads(metadata["lora_lab.config"])["lora"]["rank"] == 4
    journal = read_journal(journal_path(result.run_dir, "again"))
    assert "not an exact resume" in journal["started_from"]


@pytest.mark.parametrize(("adapter", "settings"), [("loha", {}), ("lokr", {"lokr_factor": 4}), ("dora", {})])
def test_a_lycoris_file_gives_the_run_its_type_rank_and_factor(adapter, settings, base_model, make_config):
    source = train_lora(make_config(adapter=adapter, rank=4, alpha=2, name="source", **settings, **QUICK),
                        model=copy.deepcopy(base_model))
    again = train_lora(make_config(init_lora=str(source.final_path), name="again", **QUICK),
                       model=copy.deepcopy(base_model))
    lora = again.config.lora
    assert (lora.adapter, lora.rank, again.config.alpha) == (adapter, 4, 2.0)
    assert lora.lokr_factor == settings.get("lokr_factor", -1)
    before, step0 = load_file(str(source.final_path)), load_file(str(again.checkpoints[0].path))
    assert set(before) == set(step0) and all(torch.equal(before[k].float(), step0[k]) for k in before)
    if adapter == "dora":  # a magnitude on the output axis (LyCORIS's default, PEFT's) is refused, saying why
        outputs = dict(before)
        for key in [key for key in before if key.endswith("lora_up.weight")]:
            outputs[key.replace("lora_up.weight", "dora_scale")] = torch.ones(before[key].shape[0], 1)
        path = source.final_path.with_name("output_axis.safetensors")
        save_file(outputs, str(path))
        with pytest.raises(LoraLabError, match="keeps its DoRA magnitude on the output axis"):
            train_lora(make_config(init_lora=str(path), name="output_axis", **QUICK), model=copy.deepcopy(base_model))


def test_settings_that_disagree_with_the_file_are_refused_naming_both(diffusers_file, base_model, make_config):
    for setting, message in [({"rank": 8}, "rank = 8, but .* rank = 4"),
                             ({"adapter": "loha"}, "adapter = 'loha', but .* adapter = 'lora'"),
                             ({"alpha": 5}, "alpha = 5.0, but .* alpha = 2.0"),
                             ({"targets": "attention_mlp"}, "targets = 'attention_mlp', but .*'attention'")]:
        with pytest.raises(LoraLabError, match=message):
            train_lora(make_config(init_lora=str(diffusers_file), **setting, **QUICK), model=copy.deepcopy(base_model))
    assert train_lora(make_config(init_lora=str(diffusers_file), rank=4, name="same", **QUICK),
                      model=copy.deepcopy(base_model)).config.lora.rank == 4  # agreeing is fine


def _rewritten(path, out, rename=lambda key: key, extra=None):
    tensors = {rename(key): value for key, value in load_file(str(path)).items()}
    save_file({**tensors, **(extra or {})}, str(out))
    return out


def test_files_that_do_not_fit_are_refused_before_training(diffusers_file, base_model, tmp_path, make_config):
    other = _rewritten(diffusers_file, tmp_path / "other.safetensors",
                       lambda key: key.replace("unet.down_blocks.1", "unet.down_blocks.7"))
    dora = _rewritten(diffusers_file, tmp_path / "dora.safetensors",
                      extra={"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.dora_scale":
                             torch.ones(1, 32)})
    comfy = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(32, 4),
               "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(4, 32)}, str(comfy))
    ranks = _rewritten(diffusers_file, tmp_path / "ranks.safetensors",
                       lambda key: key, {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(8, 64),
                                         "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 8)})
    cases = [(other, "has layer unet.down_blocks.7.* does not have.*another model family"),
             (dora, "dora_scale of shape .1, 32. that fits neither"),
             (comfy, "names its layers as ComfyUI does.*Train LoRA's init_lora"),
             (ranks, "layers of ranks 4, 8"), (tmp_path / "missing.safetensors", "no such file")]
    for path, message in cases:
        with pytest.raises(LoraLabError, match=message):
            train_lora(make_config(init_lora=str(path), name="x", **QUICK), model=copy.deepcopy(base_model))
    assert not (tmp_path / "out" / "x").exists() or not list((tmp_path / "out" / "x").glob("*.safetensors"))


def test_a_run_from_a_file_resumes_exactly(diffusers_file, base_model, make_config):
    settings = {**QUICK, "steps": 6, "save_every": 2, "init_lora": str(diffusers_file)}
    unbroken = train_lora(make_config(name="unbroken", **settings), model=copy.deepcopy(base_model))
    first = train_lora(make_config(name="run", **settings), StopAt(3), model=copy.deepcopy(base_model))
    assert first.stopped
    resumed = train_lora(make_config(name="run", resume="latest", **settings), model=copy.deepcopy(base_model))
    assert [c.step for c in resumed.checkpoints] == [0, 2, 3, 4, 6]  # step 0 stays in the run's list
    a, b = load_file(str(unbroken.final_path)), load_file(str(resumed.final_path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_comfyui_layout_with_flattened_convolutions_and_weight_differences(base_model, tmp_path):
    """ComfyUI's training nodes write `diffusion_model.<original path>` names, a convolution's halves
    as matrices, and full differences of norms and biases. With a model that knows its original
    names (one from a ComfyUI graph), each means what ComfyUI applies: W + (alpha/rank)·up@down
    reshaped, norm + diff, bias + diff_b; the model's own tensors are untouched (a ComfyUI model
    shares them) and the differences are written back unchanged."""
    model = copy.deepcopy(base_model)
    model.original_names = {"conv_in.weight": "diffusion_model.input_blocks.0.0.weight",
                            "conv_in.bias": "diffusion_model.input_blocks.0.0.bias",
                            "conv_norm_out.weight": "diffusion_model.out.0.weight"}
    conv = model.denoiser.conv_in
    base_weight, base_bias, norm = conv.weight, conv.bias, model.denoiser.conv_norm_out.weight
    torch.manual_seed(1)
    out_channels, in_channels, k, _ = conv.weight.shape
    up, down = torch.randn(out_channels, 2), torch.randn(2, in_channels * k * k)
    diff, diff_b = torch.randn_like(norm), torch.randn_like(base_bias)
    path = tmp_path / "comfy_trained.safetensors"
    save_file({"diffusion_model.input_blocks.0.0.lora_up.weight": up,
               "diffusion_model.input_blocks.0.0.lora_down.weight": down,
               "diffusion_model.input_blocks.0.0.alpha": torch.tensor(1.0),
               "diffusion_model.input_blocks.0.0.diff_b": diff_b,
               "diffusion_model.out.0.diff": diff}, str(path))
    start, config = started(model, path)
    assert start.layout == "ComfyUI" and config.lora.rank == 2 and config.alpha == 1.0
    (_, layer), = lora_layers(model.denoiser)
    delta = layer.get_delta_weight(ADAPTER)
    assert torch.allclose(delta, (0.5 * up @ down).reshape(conv.weight.shape), atol=1e-6)
    assert torch.equal(layer.base_layer.bias, base_bias + diff_b)
    assert torch.equal(model.denoiser.conv_norm_out.weight, norm + diff)
    assert torch.equal(base_weight, base_model.denoiser.conv_in.weight)  # the shared tensors are not changed
    assert torch.equal(base_bias, base_model.denoiser.conv_in.bias)
    assert torch.equal(norm, base_model.denoiser.conv_norm_out.weight)
    from lora_lab.trainer.export import lora_state_dict

    written = lora_state_dict(model, torch.float32)
    assert torch.equal(written["diffusion_model.out.0.diff"], diff)
    assert written["lora_unet_conv_in.lora_down.weight"].shape == (2, in_channels, k, k)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_every_family_continues_from_its_own_layout(family, tmp_path):
    """SDXL (kohya names, both text encoders) and FLUX (diffusers' names, as ai-toolkit writes
    them): a run from another run's file starts from exactly its tensors, with its settings."""
    from lora_lab.trainer.run import load_base_model

    from .tiny_models import build

    folder = build(family, tmp_path / family)
    model = load_base_model(build_config({"base_model": str(folder)}), torch.device("cpu"))
    text = {"train_text_encoder": True} if family == "sdxl" else {}
    settings = {"base_model": str(folder), "output_dir": str(tmp_path / "out"), "rank": 4, "alpha": 2,
                "resolution": 64, **QUICK}
    source = train_lora(build_config({**settings, "name": "source", **text}), model=copy.deepcopy(model))
    again = train_lora(build_config({**{k: v for k, v in settings.items() if k not in ("rank", "alpha")},
                                     "name": "again", "init_lora": str(source.final_path)}), model=copy.deepcopy(model))
    assert (again.config.lora.rank, again.config.alpha, again.config.lora.train_text_encoder) == (4, 2.0, bool(text))
    before, step0 = load_file(str(source.final_path)), load_file(str(again.checkpoints[0].path))
    assert set(before) == set(step0) and all(torch.equal(before[k].float(), step0[k]) for k in before)
    if family == "sdxl":
        assert any(k.startswith("lora_te2_") for k in step0)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_a_qwen_family_run_starts_from_its_own_file_and_from_diffusers(family, tmp_path):
    """Z-Image's files (`diffusion_model.` names) and FLUX.2's (no alpha: alpha / rank multiplied in)
    start a run whose step 0 is that file; so does the same LoRA as diffusers' save_lora_weights
    writes it (`transformer.` names), and both give the same step 0."""
    from lora_lab.trainer.export import load_into_model
    from lora_lab.trainer.run import load_base_model

    from .tiny_models import build

    folder = build(family, tmp_path / family)
    settings = {"base_model": str(folder), "steps": 2, "rank": 4, "alpha": 2.0, "resolution": 64,
                "dataset": str(embedded.CONCEPT_DATASET), "sample_every": -1}
    first = train_lora(build_config({**settings, "output_dir": str(tmp_path / "first"), "name": "first"}))
    model = load_base_model(build_config({"base_model": str(folder)}), torch.device("cpu"))
    # The alpha the file holds: FLUX.2's has none (alpha / rank is in its up halves), so it reads as rank.
    add_lora(model, 4, 2.0 if model.family.lora_alpha_in_file else 4.0, "attention", False)
    load_into_model(model, first.final_path)
    pipe = model.family.pipeline(model)
    layers = get_peft_model_state_dict(model.denoiser, adapter_name=ADAPTER)
    pipe.save_lora_weights(str(tmp_path / "diffusers"), transformer_lora_layers=layers,
                           transformer_lora_adapter_metadata=model.denoiser.peft_config[ADAPTER].to_dict())
    starts = {}
    for source in (first.final_path, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"):
        settings.pop("alpha", None)  # the file decides
        result = train_lora(build_config({**settings, "output_dir": str(tmp_path / source.stem),
                                          "name": "again", "init_lora": str(source)}))
        assert result.checkpoints[0].step == 0
        starts[source.stem] = load_file(str(result.checkpoints[0].path))
    ours, theirs = starts.values()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[key].float(), theirs[key].float(), rtol=1e-3, atol=1e-6) for key in ours)
    written = load_file(str(first.final_path))
    assert all(torch.allclose(ours[key].float(), written[key].float(), rtol=1e-3, atol=1e-6) for key in written)
