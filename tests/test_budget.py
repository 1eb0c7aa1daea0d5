"""Memory and disk checks before training, and out-of-memory during it: estimates that track the
settings, refusals that say which settings fit, and the last checkpoint kept."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from lora_lab.trainer import budget, loop
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.embedded import CONCEPT_DATASET
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.examples import TrainingSet
from lora_lab.trainer.history import read_journal
from lora_lab.trainer.lora import add_lora
from lora_lab.trainer.run import train_lora


def _estimate(model, make_config, **settings):
    config = make_config(**{"rank": 8, "batch_size": 1, **settings})
    examples = TrainingSet(model, scan_folder(CONCEPT_DATASET), 64, True, True, "", False)
    return budget.estimate_memory(model, examples, config, torch.float32)


def test_estimate_follows_batch_checkpointing_and_rank(fresh_model, make_config):
    add_lora(fresh_model, 8, 8, "attention", False)
    one = _estimate(fresh_model, make_config)
    four = _estimate(fresh_model, make_config, batch_size=4)
    checkpointed = _estimate(fresh_model, make_config, batch_size=4, gradient_checkpointing=True)
    print("one step MiB, batch 1 / 4 / 4 checkpointed:", [round(e.step / 2**20, 1) for e in (one, four, checkpointed)])
    assert 2 * one.step < four.step < 5 * one.step  # activations grow with the batch; LoRA gradients do not
    assert checkpointed.step < 0.6 * four.step
    assert one.adapters == sum(p.numel() * 4 for n, p in fresh_model.denoiser.named_parameters() if "lora_" in n)
    assert one.optimizer == 2 * one.adapters  # AdamW: two fp32 moments per weight
    assert one.base > 10 * one.adapters and "GiB" in one.describe()


def test_live_tensor_bytes_counts_a_step_not_the_frozen_weights_it_reads():
    """A linear layer's backward keeps a view of its frozen weight: that view is the weight, not
    memory the step adds (counted, a full-size FLUX estimate doubled its base model)."""
    layer = torch.nn.Linear(1000, 1000).requires_grad_(False)
    inputs = torch.randn(8, 1000, requires_grad=True)
    counter = budget.LiveTensorBytes()
    with counter:
        layer(inputs).sum().backward()
    assert inputs.numel() * 4 <= counter.peak < 0.05 * layer.weight.numel() * 4  # the output, then the gradient


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_of_a_step_is_within_15_percent_of_a_measured_step(fresh_model, make_config, checkpointing):
    """The meta-device estimate against a real step on the CPU, both counted as live tensor bytes."""
    add_lora(fresh_model, 8, 8, "attention", False)
    config = make_config(rank=8, batch_size=4, gradient_checkpointing=checkpointing)
    examples = TrainingSet(fresh_model, scan_folder(CONCEPT_DATASET), 64, True, True, "", False)
    estimate = budget.estimate_memory(fresh_model, examples, config, torch.float32).step
    latents, conditioning = examples.batch([3, 4, 5, 6], torch.float32)  # four square images: one bucket
    denoiser = fresh_model.denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    counter = budget.LiveTensorBytes()
    with counter:
        prediction = fresh_model.family.predict(fresh_model, torch.randn_like(latents), torch.full((4,), 500),
                                                conditioning)
        torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
    denoiser.eval().disable_gradient_checkpointing()
    print(f"one step (checkpointing {checkpointing}): estimate {estimate / 2**20:.1f} MiB, measured "
          f"{counter.peak / 2**20:.1f} MiB")
    assert abs(estimate - counter.peak) <= 0.15 * counter.peak


def test_a_run_that_will_not_fit_is_refused_with_settings_that_fit(make_config, fresh_model, monkeypatch):
    config = make_config(steps=2, rank=8, batch_size=4)
    examples = TrainingSet(fresh_model, scan_folder(CONCEPT_DATASET), 64, True, True, "", False)
    add_lora(fresh_model, 8, 8, "attention", False)
    needed = budget.estimate_memory(fresh_model, examples, config, torch.float32)
    fitting = budget.estimate_memory(fresh_model, examples, make_config(steps=2, rank=8, batch_size=4,
                                                                        gradient_checkpointing=True), torch.float32)
    monkeypatch.setattr(budget, "free_memory", lambda device: (needed.training + fitting.training) // 2)
    with pytest.raises(LoraLabError, match="To fit: turn on gradient_checkpointing.*check_memory"):
        budget.check_memory(fresh_model, examples, config, torch.float32)
    budget.check_memory(fresh_model, examples, make_config(steps=2, rank=8, batch_size=4, check_memory=False),
                        torch.float32)  # the user may try anyway


def test_too_little_disk_is_refused_before_training(make_config, fresh_model, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LoraLabError, match="need about .* GiB but .* free.*save_every"):
        train_lora(make_config(steps=4, rank=8), model=fresh_model)


def test_out_of_memory_keeps_the_last_checkpoint_and_advises(make_config, fresh_model, monkeypatch):
    calls = {"n": 0}
    predict = fresh_model.family.predict

    def failing_predict(model, noisy, *args):
        calls["n"] += noisy.device.type != "meta" and torch.is_grad_enabled()  # training steps only
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(model, noisy, *args)

    monkeypatch.setattr(fresh_model.family, "predict", failing_predict)
    config = make_config(steps=4, rank=8, save_every=2, name="oom")
    with pytest.raises(LoraLabError, match="Out of memory at step 3.*resumed.*gradient_checkpointing"):
        train_lora(config, model=fresh_model)
    run_dir = loop.Path(config.output.output_dir) / "oom"
    assert sorted(p.name for p in run_dir.glob("oom*")) == ["oom-loss.csv", "oom-run.json",
                                                         "oom-step000002-samples.png", "oom-step000002.resume",
                                                         "oom-step000002.safetensors"]
    journal = read_journal(run_dir / "oom-run.json")  # what a reloaded page shows: why the run ended
    assert journal["status"] == "failed" and "Out of memory at step 3" in journal["message"]
    assert [c["step"] for c in journal["checkpoints"]] == [2] and journal["step"] == 2


def test_fp8_base_is_suggested_when_only_a_smaller_base_fits(make_config, fresh_model, monkeypatch):
    config = make_config(steps=2, rank=8, batch_size=1, gradient_checkpointing=True)
    examples = TrainingSet(fresh_model, scan_folder(CONCEPT_DATASET), 64, True, True, "", False)
    add_lora(fresh_model, 8, 8, "attention", False)
    needed = budget.estimate_memory(fresh_model, examples, config, torch.float32)
    monkeypatch.setattr(budget, "free_memory", lambda device: needed.training - 1000)
    with pytest.raises(LoraLabError, match="To fit: turn on fp8_base"):
        budget.check_memory(fresh_model, examples, config, torch.float32)


def test_the_estimate_counts_the_text_encoder_when_it_trains(fresh_model, make_config):
    """With text-encoder LoRA, a step also keeps the text encoder's activations: what the estimate
    adds for them is within 25% of what a real step adds (one that encodes the captions with
    gradients against one that does not), and the whole stays within 15% of the real step."""
    add_lora(fresh_model, 8, 8, "attention", True)
    examples = TrainingSet(fresh_model, scan_folder(CONCEPT_DATASET), 64, True, True, "", True)
    frozen = budget.estimate_memory(fresh_model, examples, make_config(rank=8, batch_size=4), torch.float32)
    trained = budget.estimate_memory(fresh_model, examples, make_config(rank=8, batch_size=4, train_text_encoder=True),
                                     torch.float32)

    def measured(text_gradients: bool) -> int:
        counter = budget.LiveTensorBytes()
        with counter:
            with torch.set_grad_enabled(text_gradients):
                latents, conditioning = examples.batch([3, 4, 5, 6], torch.float32)
            prediction = fresh_model.family.predict(fresh_model, torch.randn_like(latents), torch.full((4,), 500),
                                                    conditioning)
            torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
        return counter.peak

    without, with_text = measured(False), measured(True)
    print(f"one step, MiB: estimate {frozen.step / 2**20:.1f} frozen, {trained.step / 2**20:.1f} trained; measured "
          f"{without / 2**20:.1f} frozen, {with_text / 2**20:.1f} trained")
    assert abs((trained.step - frozen.step) - (with_text - without)) <= 0.25 * (with_text - without)
    assert abs(trained.step - with_text) <= 0.15 * with_text
