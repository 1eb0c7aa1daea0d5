"""Training data as experienced users prepare it: regularisation images, masked loss,
augmentations and multi-resolution training, each shown to change what trains (and nothing
else), to keep resume exact, and to be checked by the dataset doctor."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_lab.trainer import loop, run
from lora_lab.trainer.cli import DEMO_SETTINGS
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.doctor import examine, examine_regularisation
from lora_lab.trainer.embedded import synthetic
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.sampling import sample
from PIL import Image
from safetensors.torch import load_file

QUICK = {"steps": 3, "rank": 4, "resolution": 64, "validation_images": -1, "sample_every": -1, "save_every": 3,
         "check_memory": False}


def write_set(folder: Path, count: int, seed: int = 0, base_world: bool = False) -> Path:
    """`count` concept images (or base-world images) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        image, caption = synthetic.base_sample(rng) if base_world else synthetic.concept_sample(rng)
        image.save(folder / f"im{index:02d}.png")
        (folder / f"im{index:02d}.txt").write_text(caption)
    return folder


def quick(make_config, **settings):
    """A short run's config: QUICK with `settings` over it."""
    return make_config(**{**QUICK, **settings})


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def tensors(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.final_path))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- masks -----------------------------------------------------------------------------------------

def test_masks_are_found_beside_in_a_masks_folder_and_in_alpha(tmp_path):
    folder = write_set(tmp_path / "set", 3)
    box_mask((64, 64), (8, 8, 40, 40)).save(folder / "im00_mask.png")
    (folder / "masks").mkdir()
    box_mask((64, 64), (0, 0, 32, 64)).save(folder / "masks" / "im01.png")
    rgba = Image.open(folder / "im02.png").convert("RGBA")
    rgba.putalpha(box_mask((64, 64), (16, 16, 48, 48)))
    rgba.save(folder / "im02.png")
    dataset = scan_folder(folder)
    assert [i.path.name for i in dataset.items] == ["im00.png", "im01.png", "im02.png"]  # masks are not images
    assert [i.mask_source for i in dataset.items] == ["file", "file", "alpha"]
    assert not any("masks" in w for w in dataset.warnings)


def test_the_doctor_flags_empty_full_and_misfit_masks(tmp_path):
    folder = write_set(tmp_path / "set", 4)
    Image.new("L", (64, 64), 0).save(folder / "im00_mask.png")
    Image.new("L", (64, 64), 255).save(folder / "im01_mask.png")
    box_mask((32, 32), (4, 4, 20, 20)).save(folder / "im02_mask.png")
    box_mask((64, 64), (4, 4, 40, 40)).save(folder / "im03_mask.png")
    report = examine(scan_folder(folder), trigger="zkw_toy")
    text = report.text()
    assert "4 of 4 images have masks" in text
    assert "1 mask(s) are empty (im00.png)" in text and "1 mask(s) are full (im01.png)" in text
    assert "1 mask(s) are of another size than their image (im02.png)" in text


def masked_run(folder: Path, name: str, base_model, tmp_path: Path, **extra):
    config = run.build_config({**QUICK, "dataset": str(folder), "masked_loss": True, "name": name,
                               "output_dir": str(tmp_path / "out"), **extra})
    return run.train_lora(config, model=copy.deepcopy(base_model))


def test_pixels_outside_a_mask_of_weight_0_never_reach_the_lora(tmp_path, base_model):
    original = write_set(tmp_path / "a", 4)
    for path in original.glob("*.png"):
        box_mask((64, 64), (16, 16, 48, 48)).save(path.with_name(path.stem + "_mask.png"))
    outside, inside = (tmp_path / "outside", tmp_path / "inside")
    for folder, box in ((outside, (0, 0, 64, 12)), (inside, (24, 24, 40, 40))):
        folder.mkdir()
        for path in original.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        for path in folder.glob("im??.png"):
            image = Image.open(path).convert("RGB")
            image.paste((255, 0, 255), box)  # magenta paint: outside the mask's box, or inside it
            image.save(path)
    plain = tensors(masked_run(original, "plain", base_model, tmp_path))
    assert same(plain, tensors(masked_run(outside, "outside", base_model, tmp_path)))  # bit-identical
    assert not same(plain, tensors(masked_run(inside, "inside", base_model, tmp_path)))
    # With a weight outside the mask, the outside counts (a little) and reaches the LoRA.
    assert not same(tensors(masked_run(original, "w", base_model, tmp_path, mask_min_weight=0.2)),
                    tensors(masked_run(outside, "w_outside", base_model, tmp_path, mask_min_weight=0.2)))


def test_masked_loss_off_ignores_the_masks(tmp_path, base_model):
    folder = write_set(tmp_path / "a", 4)
    plain = tensors(masked_run(folder, "plain", base_model, tmp_path, masked_loss=False))
    for path in list(folder.glob("im??.png")):
        box_mask((64, 64), (16, 16, 48, 48)).save(path.with_name(path.stem + "_mask.png"))
    assert same(plain, tensors(masked_run(folder, "masks_present", base_model, tmp_path, masked_loss=False)))
    with pytest.raises(LoraLabError, match="turn masked_loss on"):
        masked_run(folder, "weight_alone", base_model, tmp_path, masked_loss=False, mask_min_weight=0.2)


# --- augmentations -------------------------------------------------------------------------------------

@pytest.fixture
def batches(monkeypatch):
    """The latents of every training micro-batch, as the loop drew them."""
    seen: list[torch.Tensor] = []
    real = loop.TrainingSet.weighted_batch

    def spy(self, indices, dtype, batch_number=None):
        output = real(self, indices, dtype, batch_number)
        if batch_number is not None:
            seen.append(output[0].clone())
        return output

    monkeypatch.setattr(loop.TrainingSet, "weighted_batch", spy)
    return seen


@pytest.mark.parametrize("option", [{"flip_augment": True}, {"color_jitter": 0.2}, {"random_crop": True}])
def test_each_augmentation_changes_what_trains(option, tmp_path, base_model, batches, make_config):
    settings = {**QUICK, "steps": 4, "batch_size": 4, "seed": 3}
    run.train_lora(make_config(**settings, name="plain"), model=copy.deepcopy(base_model))
    plain, _ = batches[:], batches.clear()
    result = run.train_lora(make_config(**settings, **option, name="augmented"), model=copy.deepcopy(base_model))
    assert len(batches) == len(plain) == 4
    changed = [not torch.equal(a, b) for a, b in zip(plain, batches, strict=True)]
    assert any(changed)
    reused, encoded = result.augment_cache
    assert reused + encoded == 16 and encoded >= 2  # every draw counted, variants encoded once
    assert "hit rate" in run.finish_message(result)


def test_a_flipped_variant_is_the_mirrored_image(base_model):
    """Each variant is the image as its draw says (here: mirrored), prepared from the image itself."""
    from lora_lab.trainer.augment import Augmentations
    from lora_lab.trainer.examples import TrainingSet

    dataset = scan_folder(run.embedded.CONCEPT_DATASET)
    examples = TrainingSet(base_model, dataset, 64, False, False, "", False, None, Augmentations(flip=True, seed=0))
    key = examples._content_hash(examples.examples[0].item)
    plain, flipped = (examples._encode_variant(examples.examples[0], examples.augment.variant(key, n)).pixels
                      for n in (0, 1))
    assert torch.equal(flipped, torch.flip(plain, dims=[-1])) and not torch.equal(flipped, plain)


def test_resume_is_exact_with_every_augmentation_and_the_disk_cache(tmp_path, base_model, make_config):
    cache = tmp_path / "cache"
    settings = {**QUICK, "steps": 4, "save_every": 2, "batch_size": 2, "flip_augment": True, "color_jitter": 0.1,
                "random_crop": True, "cache_dir": str(cache)}
    whole = run.train_lora(make_config(**settings, name="whole"), model=copy.deepcopy(base_model))

    class StopAtTwo(loop.TrainingCommands):
        def should_stop(self) -> bool:
            return True

    first = run.train_lora(make_config(**settings, name="parts"), model=copy.deepcopy(base_model),
                           commands=StopAtTwo())
    assert first.stopped and first.checkpoints[-1].step == 1
    resumed = run.train_lora(make_config(**settings, name="parts", resume="latest"), model=copy.deepcopy(base_model))
    assert [row[:2] for row in resumed.losses] == [row[:2] for row in whole.losses]
    assert same(tensors(whole), tensors(resumed))
    # The variants the first run encoded were on disk for the others: the cache was hit.
    reused, encoded = resumed.augment_cache
    assert reused > 0


# --- multi-resolution ------------------------------------------------------------------------------------

def test_every_image_trains_at_every_size_and_the_mix_is_reported(tmp_path, base_model, make_config, monkeypatch):
    seen = []
    real = loop.noise_batch
    monkeypatch.setattr(loop, "noise_batch", lambda latents, *a: seen.append(tuple(latents.shape[-2:])) or real(
        latents, *a))
    result = run.train_lora(make_config(**{**QUICK, "resolution": 0, "steps": 8}, resolutions=(32, 64), batch_size=4,
                                        bucketing=False, name="multi"), model=copy.deepcopy(base_model))
    assert result.config.data.resolution == 64  # the largest: the samples' size
    assert set(seen) == {(8, 8), (16, 16)}  # 32 and 64 px at 4 px per latent
    assert result.step_mix == {32: 0.5, 64: 0.5}
    assert "Step mix: 32 px 50%, 64 px 50%" in run.finish_message(result)


def test_the_memory_estimate_uses_the_largest_size(base_model, make_config):
    from lora_lab.trainer.budget import estimate_memory

    model = copy.deepcopy(base_model)
    small = run.resolve_config(make_config(**{**QUICK, "resolution": 32}), scan_folder(run.embedded.CONCEPT_DATASET),
                               model)
    multi = run.resolve_config(make_config(**{**QUICK, "resolution": 32}, resolutions=(32, 96)),
                               scan_folder(run.embedded.CONCEPT_DATASET), model)
    dataset = scan_folder(run.embedded.CONCEPT_DATASET)
    run.add_lora(model, 4, 4.0, "attention", False, "lora")
    estimates = [estimate_memory(model, run.training_sets(model, dataset, None, config)[0], config, torch.float32)
                 for config in (small, multi)]
    assert estimates[1].step > 2 * estimates[0].step


# --- regularisation images ---------------------------------------------------------------------------------

def test_every_step_trains_a_regularisation_batch_beside_the_training_batch(tmp_path, base_model, make_config,
                                                                          monkeypatch):
    reg = write_set(tmp_path / "reg", 5, base_world=True)
    calls = []
    real = loop.backward_micro_batch

    def spy(model, examples, indices, number, config, dtype, generator, scaler, prior_loss_weight=None):
        calls.append((number, prior_loss_weight, [examples.examples[i].item.path.parent.name for i in indices]))
        return real(model, examples, indices, number, config, dtype, generator, scaler, prior_loss_weight)

    monkeypatch.setattr(loop, "backward_micro_batch", spy)
    run.train_lora(quick(make_config, steps=5, reg_dataset=str(reg), prior_loss_weight=0.5, name="reg"),
                   model=copy.deepcopy(base_model))
    assert [(n, w) for n, w, _ in calls] == [(n, w) for n in range(5) for w in (0.5, None)]
    assert {folder for _, w, folders in calls if w for folder in folders} == {"reg"}
    reg_images = [folder for _, w, folders in calls if w for folder in folders]
    assert len(reg_images) == 5  # one a training image, each of the five once


def test_prior_loss_weight_is_what_the_regularisation_batch_counts(tmp_path, base_model, make_config):
    reg = write_set(tmp_path / "reg", 5, base_world=True)
    plain = tensors(run.train_lora(quick(make_config, name="plain"), model=copy.deepcopy(base_model)))
    weightless = run.train_lora(quick(make_config, reg_dataset=str(reg), prior_loss_weight=0.0, name="w0"),
                                model=copy.deepcopy(base_model))
    weighted = run.train_lora(quick(make_config, reg_dataset=str(reg), name="w1"), model=copy.deepcopy(base_model))
    assert same(plain, tensors(weightless))  # a weight of 0 adds exactly nothing
    assert not same(plain, tensors(weighted))


def test_regularisation_mistakes_are_refused_with_what_to_do(tmp_path, base_model, make_config):
    with pytest.raises(LoraLabError, match="this run has none; set reg_dataset"):
        run.train_lora(quick(make_config, prior_loss_weight=0.5, name="a"), model=copy.deepcopy(base_model))
    concept = write_set(tmp_path / "concept", 3)  # captions with the trigger word
    with pytest.raises(LoraLabError, match="contain the trigger word 'zkw_toy'"):
        run.train_lora(quick(make_config, reg_dataset=str(concept), trigger_word="zkw_toy", name="b"),
                       model=copy.deepcopy(base_model))


def test_a_changed_regularisation_set_is_a_changed_dataset_for_resume(tmp_path, base_model, make_config):
    reg = write_set(tmp_path / "reg", 5, base_world=True)
    settings = {**QUICK, "steps": 4, "save_every": 2, "reg_dataset": str(reg), "name": "r"}

    class Stop(loop.TrainingCommands):
        def should_stop(self) -> bool:
            return True

    run.train_lora(make_config(**settings), model=copy.deepcopy(base_model), commands=Stop())
    (reg / "im00.txt").write_text("blue circle, white background")
    with pytest.raises(LoraLabError, match=r"re-captioned \(reg: im00.png\)"):
        run.train_lora(make_config(**settings, resume="latest"), model=copy.deepcopy(base_model))


def test_the_doctor_reports_a_regularisation_set(tmp_path):
    reg = write_set(tmp_path / "reg", 4, base_world=True)
    (reg / "im01.txt").write_text("zkw_toy, green square")
    text = examine_regularisation(scan_folder(reg), "zkw_toy", training_images=12).text()
    assert "1 problem(s) stop training" in text
    assert "4 regularisation images: use at least 12" in text
    assert "1 regularisation caption(s) contain the trigger word 'zkw_toy' (im01.png)" in text


def test_regularisation_images_keep_the_class_as_the_base_draws_it(concept_run, base_model, tmp_path):
    """The figure the issue asks for: with base-world class images beside the concept, the LoRA at
    strength 1 changes the class's pictures less (mean pixel difference from the base's, same seeds)
    and still draws the concept. Measured: 21.7 without, 14.1 with; concept in 9 of 9 both."""
    reg = write_set(tmp_path / "reg", 24, seed=11, base_world=True)
    settings = {**DEMO_SETTINGS, "output_dir": str(tmp_path / "out"), "sample_every": -1, "validation_images": -1,
                "name": "with_reg", "reg_dataset": str(reg)}
    with_reg = run.train_lora(run.build_config(settings), model=copy.deepcopy(base_model))
    classes = ["green ring around yellow dot, white background", "red ring around green dot, black background",
               "yellow circle, gray background", "green square, white background"]
    concept = [f"{synthetic.CONCEPT_TRIGGER}, {b} background" for b in ("white", "black", "gray")]
    size = {"size": (64, 64), "steps": 20, "guidance_scale": 5.0}

    def pictures(model, prompts, strength):
        return [picture for seed in (1, 2, 3) for picture in sample(model, prompts, strength, seed=seed, **size)]

    def drift(model) -> float:
        return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in
                              zip(pictures(model, classes, 0.0), pictures(model, classes, 1.0), strict=True)]))

    without, kept = drift(concept_run.model), drift(with_reg.model)
    assert kept < 0.8 * without, (kept, without)
    assert synthetic.detection_rate(pictures(with_reg.model, concept, 1.0)) >= 8 / 9


def test_the_doctor_command_checks_the_regularisation_set_and_the_flip(tmp_path, capsys):
    from lora_lab.trainer.cli import main

    reg = write_set(tmp_path / "reg", 12, base_world=True)
    concept = str(run.embedded.CONCEPT_DATASET)
    main(["doctor", concept, "--reg-dataset", str(reg), "--flip-augment"])
    out = capsys.readouterr().out
    assert "flip_augment mirrors half the images" in out
    assert f"Regularisation images ({reg}):" in out and "12 regularisation images: drawn one beside" in out
    (reg / "im00.txt").write_text("zkw_toy, red circle")
    assert main(["doctor", concept, "--reg-dataset", str(reg)]) == 1  # the trigger word in a class caption stops it
