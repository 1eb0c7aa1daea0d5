"""Watching a run learn: samples and validation loss between steps never change what trains; the
validation loss compares from one evaluation to the next; a run forced to overfit is caught by its
validation curve and the earlier checkpoint is recommended; the recommendation follows the guide."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from lora_lab.trainer import embedded
from lora_lab.trainer.diagnosis import Diagnosis
from lora_lab.trainer.history import read_journal
from lora_lab.trainer.loop import Checkpoint
from lora_lab.trainer.resume import read_state, state_path
from lora_lab.trainer.run import train_lora
from lora_lab.trainer.watch import recommend

QUICK = {"steps": 6, "rank": 4, "batch_size": 2, "learning_rate": 1e-3, "save_every": 3, "validation_images": 2}


def test_samples_and_validation_never_change_what_trains(make_config, base_model):
    watched = train_lora(make_config(**QUICK, name="watched", sample_every=1, validation_every=1),
                         model=copy.deepcopy(base_model))
    quiet = train_lora(make_config(**QUICK, name="quiet", sample_every=-1, validation_every=1000),
                       model=copy.deepcopy(base_model))
    assert len(watched.samples) == 6 and len(watched.validation) == 6 and quiet.samples == []
    assert [c.step for c in quiet.checkpoints] == [3, 6] and [s for s, _ in quiet.validation] == [3, 6]
    ours, theirs = read_state(state_path(watched.final_path)).lora, read_state(state_path(quiet.final_path)).lora
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # bit-identical
    assert watched.losses == quiet.losses


def test_sample_prompts_are_encoded_once_through_the_cache_and_again_only_for_a_trained_text_encoder(
        base_model, tmp_path):
    """Sample prompts go through the training set's encoding cache (a resumed run reuses them); a
    negative is encoded only where classifier-free guidance reads it; a text encoder being trained
    encodes the prompts again at each sample, so the samples show its LoRA."""
    from lora_lab.trainer.data import scan_folder
    from lora_lab.trainer.examples import TrainingSet
    from lora_lab.trainer.previews import PreviewSampler

    model = copy.deepcopy(base_model)
    dataset = scan_folder(embedded.CONCEPT_DATASET)
    for attempt in range(2):
        examples = TrainingSet(model, dataset, 64, True, True, str(tmp_path / "cache"), False)
        hits = examples.disk.hits
        encoded = examples.encode_prompts(["zkw_toy, a", "zkw_toy, b"])
        assert encoded["prompt_embeds"].shape[0] == 2
        assert examples.disk.hits - hits == 2 * attempt  # the second time, both come from the cache

    calls: list[list[str]] = []

    def spy(texts: list[str]) -> dict:
        calls.append(texts)
        return model.encoders.encode_prompts(texts)

    PreviewSampler(model, ["a", "b"], (64, 64), 2, 1.0, 0, torch.float32, negative="ugly", encode=spy)
    PreviewSampler(model, ["a", "b"], (64, 64), 2, 5.0, 0, torch.float32, negative="ugly", encode=spy)
    assert calls == [["a", "b"], ["a", "b", "ugly"]]  # guidance 1 reads no negative
    calls.clear()
    sampler = PreviewSampler(model, ["a"], (64, 64), 1, 5.0, 0, torch.float32, encode=spy, text_trained=True)
    sampler.sample()
    sampler.sample()
    assert len(calls) == 3


def test_validation_loss_compares_from_one_evaluation_to_the_next(make_config, base_model):
    from lora_lab.trainer.data import scan_folder, split_validation
    from lora_lab.trainer.examples import TrainingSet
    from lora_lab.trainer.validation import ValidationLoss

    model = copy.deepcopy(base_model)
    _, held_out = split_validation(scan_folder(embedded.CONCEPT_DATASET), 2)
    measure = ValidationLoss(model, TrainingSet(model, held_out, 64, True, True, "", False), torch.float32, 4)
    torch.manual_seed(0)
    first = measure()
    torch.manual_seed(123)  # whatever the global generators hold, the measurement is the same
    assert measure() == first and len(measure) == 2
    state = torch.get_rng_state()
    measure()
    assert torch.equal(torch.get_rng_state(), state)  # and it leaves them as they were


def test_a_run_forced_to_overfit_is_caught_and_an_earlier_checkpoint_recommended(make_config, base_model, tmp_path):
    """Four training images, a high learning rate, many steps: the LoRA memorises its images, and
    the loss on the two held-out ones turns upward."""
    folder = tmp_path / "few" / "1_zkw_toy"
    folder.mkdir(parents=True)
    for image in sorted((embedded.CONCEPT_DATASET / "10_zkw_toy").glob("*.png"))[:6]:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)
    result = train_lora(make_config(dataset=str(folder.parent), steps=400, rank=32, learning_rate=3e-3, batch_size=2,
                                    save_every=50, validation_images=2, validation_every=20, sample_every=-1,
                                    name="overfit"), model=copy.deepcopy(base_model))
    curve = ", ".join(f"{step}: {loss:.4f}" for step, loss in result.validation)
    print(f"validation loss: {curve}; {result.diagnosis}; recommended step {result.best.step}")
    assert result.diagnosis.pattern == "overfitting" and "validation" in result.diagnosis.evidence
    assert result.best.step < 400 and result.best.path.is_file()
    journal = read_journal(result.run_dir / "overfit-run.json")
    assert journal["best"] == {"step": result.best.step, "file": result.best.path.name}
    assert journal["diagnosis"]["pattern"] == "overfitting"


def _checkpoints(*steps: int) -> list[Checkpoint]:
    return [Checkpoint(step, Path(f"run-step{step:06d}.safetensors"), step == steps[-1]) for step in steps]


def test_the_recommended_checkpoint_follows_the_guide():
    working = Diagnosis("working", "", "")
    overfitting = Diagnosis("overfitting", "", "", lowest_step=130)
    checkpoints = _checkpoints(100, 200, 300)
    assert recommend(checkpoints, [(100, 0.3), (150, 0.1), (200, 0.2), (300, 0.25)], working).step == 200
    assert recommend(checkpoints, [], working).step == 300  # no validation, no sign of overfitting: the last
    assert recommend(checkpoints, [], overfitting).step == 100  # the one nearest the lowest loss
    assert recommend([], [], working) is None


@pytest.mark.parametrize("images", [5, 12, 40, 200])
def test_validation_is_held_out_only_where_enough_images_remain(images):
    from lora_lab.trainer.data import validation_count

    held = validation_count(images, 0)
    assert held == {5: 0, 12: 2, 40: 4, 200: 10}[images]
    assert validation_count(images, -1) == 0 and validation_count(images, 3) == 3
