"""Exact resume: a run stopped at step k and resumed ends with the same LoRA as a run that was never
stopped, wherever k falls; changed settings or data are refused unless allowed, and recorded."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.examples import TrainingSet
from lora_lab.trainer.files import read_metadata
from lora_lab.trainer.history import read_journal
from lora_lab.trainer.loop import TrainingCommands, TrainingEvents
from lora_lab.trainer.resume import read_state, state_path
from lora_lab.trainer.run import train_lora
from PIL import Image, ImageDraw

STEPS = 12
# A warm-up and cosine schedule, noise offset and min-SNR: every piece of state a resume must restore.
SETTINGS = {"steps": STEPS, "rank": 4, "learning_rate": 5e-4, "batch_size": 2, "save_every": 4, "seed": 7,
            "lr_scheduler": "cosine", "warmup_steps": 3, "noise_offset": 0.05, "min_snr_gamma": 5.0, "name": "run"}


class StopAt(TrainingEvents, TrainingCommands):
    def __init__(self, step: int) -> None:
        self.stop_step, self.step = step, 0

    def on_step(self, report) -> None:
        self.step = report.step

    def should_stop(self) -> bool:
        return self.step == self.stop_step


@pytest.fixture(scope="module")
def two_bucket_dataset(tmp_path_factory):
    """Square and wide images, so batches switch between two buckets."""
    folder = tmp_path_factory.mktemp("data") / "2_zkw_thing"
    folder.mkdir()
    for index in range(7):
        size = (64, 64) if index < 4 else (128, 64)
        image = Image.new("RGB", size, (40 * index, 200, 255 - 30 * index))
        ImageDraw.Draw(image).ellipse((8, 8, 48, 48), fill=(255, 0, 255))
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"zkw thing, picture {index}")
    return folder.parent


def _train(make_config, base_model, dataset_dir, events=None, **settings):
    config = make_config(dataset=str(dataset_dir), **{**SETTINGS, **settings})
    return train_lora(config, events, model=copy.deepcopy(base_model))


def _final_weights(result) -> dict[str, torch.Tensor]:
    return read_state(state_path(result.final_path)).lora


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_model, two_bucket_dataset):
    from lora_lab.trainer.config import build_config

    out = tmp_path_factory.mktemp("reference")
    config = build_config({**SETTINGS, "dataset": str(two_bucket_dataset), "output_dir": str(out)})
    return train_lora(config, model=copy.deepcopy(base_model))


def _bucket_change_step(base_model, dataset_dir) -> int:
    """A step k whose next batch comes from another bucket than batch k."""
    from lora_lab.trainer.data import BatchOrder

    model = copy.deepcopy(base_model)
    examples = TrainingSet(model, scan_folder(dataset_dir), 64, True, True, "", False)
    order = BatchOrder(examples.buckets, examples.repeats, SETTINGS["batch_size"], SETTINGS["seed"])
    buckets = [examples.buckets[order.batch(n)[0]] for n in range(STEPS)]
    return next(k for k in range(2, STEPS) if buckets[k - 1] != buckets[k] and k % 4)


def _assert_same(result, reference) -> None:
    got, expected = _final_weights(result), _final_weights(reference)
    assert got.keys() == expected.keys()
    worst = max((got[name] - expected[name]).abs().max().item() for name in got)
    print(f"largest difference from the uninterrupted run: {worst:.3g}")
    assert worst <= 1e-6
    assert [round(loss, 6) for _, loss, _ in result.losses] == [round(loss, 6) for _, loss, _ in reference.losses]


@pytest.mark.parametrize("where", ["mid-epoch", "checkpoint", "bucket change"])
def test_stop_and_resume_matches_an_uninterrupted_run(where, make_config, base_model, two_bucket_dataset,
                                                      reference):
    stop = {"mid-epoch": 3, "checkpoint": 8, "bucket change": None}[where]
    stop = stop or _bucket_change_step(base_model, two_bucket_dataset)
    first = _train(make_config, base_model, two_bucket_dataset, StopAt(stop))
    assert first.stopped and first.checkpoints[-1].step == stop
    journal = read_journal(first.run_dir / "run-run.json")  # what the training panel shows after a reload
    assert journal["status"] == "stopped" and f"Stopped at step {stop} of {STEPS}" in journal["message"]
    assert "resume to 'latest'" in journal["message"]
    resumed = _train(make_config, base_model, two_bucket_dataset, resume="latest")
    # The resumed run knows every checkpoint of the run, the earlier segment's too (Sample
    # Checkpoint's "all" and the recommendation choose among them).
    assert [c.step for c in resumed.checkpoints] == sorted({4, 8, 12, stop})
    assert all(c.path.is_file() for c in resumed.checkpoints)
    _assert_same(resumed, reference)
    lines = (resumed.run_dir / "run-loss.csv").read_text().splitlines()
    assert len(lines) == STEPS + 1  # the loss log covers the whole run, once
    journal = read_journal(resumed.run_dir / "run-run.json")
    assert (journal["status"], journal["step"], journal["total_steps"]) == ("finished", STEPS, STEPS)
    assert [c["step"] for c in journal["checkpoints"]] == sorted({4, 8, 12, stop})


def test_resume_of_a_resume_and_from_a_chosen_checkpoint(make_config, base_model, two_bucket_dataset, reference):
    _train(make_config, base_model, two_bucket_dataset, StopAt(2))
    second = _train(make_config, base_model, two_bucket_dataset, StopAt(6), resume="latest")
    assert second.stopped and second.checkpoints[-1].step == 6
    third = _train(make_config, base_model, two_bucket_dataset, resume="latest")
    _assert_same(third, reference)
    assert [c.step for c in third.checkpoints] == [2, 4, 6, 8, 12]  # every segment's, across two resumes
    # A chosen earlier checkpoint (by its LoRA file) gives the same end as well; the checkpoints
    # saved after it belong to another future and are not the run's any more.
    chosen = second.run_dir / "run-step000004.safetensors"
    again = _train(make_config, base_model, two_bucket_dataset, resume=str(chosen))
    _assert_same(again, reference)
    assert [c.step for c in again.checkpoints] == [2, 4, 8, 12]


def test_a_resume_file_names_no_local_folder(make_config, base_model, two_bucket_dataset, tmp_path):
    first = _train(make_config, base_model, two_bucket_dataset, StopAt(2))
    state = read_state(first.final_path.with_suffix(".resume"))
    assert state.config["output"]["output_dir"] == "out" and state.config["data"]["dataset"] == two_bucket_dataset.name
    raw = first.final_path.with_suffix(".resume").read_bytes()
    assert str(tmp_path).encode() not in raw and str(two_bucket_dataset.parent).encode() not in raw
    # The whole run folder moved elsewhere still resumes.
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.move(str(first.run_dir.parent), moved)
    resumed = _train(make_config, base_model, two_bucket_dataset, resume=str(moved / "run" / first.final_path.name),
                     output_dir=str(moved))
    assert resumed.checkpoints[-1].step == STEPS and [c.step for c in resumed.checkpoints][:1] == [2]


def test_changed_settings_or_data_are_refused_unless_allowed(make_config, base_model, two_bucket_dataset, tmp_path):
    _train(make_config, base_model, two_bucket_dataset, StopAt(2))
    with pytest.raises(LoraLabError, match=r"learning_rate: 0.0005 -> 0.001.*resume_with_changes"):
        _train(make_config, base_model, two_bucket_dataset, resume="latest", learning_rate=1e-3)
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(two_bucket_dataset, changed)
    (changed / "2_zkw_thing" / "img1.txt").write_text("another caption")
    (changed / "2_zkw_thing" / "img6.png").unlink()
    with pytest.raises(LoraLabError, match=r"1 image\(s\) removed \(2_zkw_thing/img6.png\).*1 image\(s\) re-captioned"):
        _train(make_config, base_model, changed, resume="latest")
    result = _train(make_config, base_model, two_bucket_dataset, resume="latest", learning_rate=1e-3,
                    resume_with_changes=True)
    assert result.checkpoints[-1].step == STEPS
    assert "learning_rate: 0.0005 -> 0.001" in read_metadata(result.final_path)["lora_lab.resume_history"]


def test_resume_errors_say_what_to_do(make_config, base_model, two_bucket_dataset, reference):
    with pytest.raises(LoraLabError, match="Nothing to resume"):
        _train(make_config, base_model, two_bucket_dataset, resume="latest", name="never_ran")
    with pytest.raises(LoraLabError, match="nothing left to train"):
        _train(make_config, base_model, two_bucket_dataset, resume=str(reference.final_path))
    _train(make_config, base_model, two_bucket_dataset, StopAt(1))
    with pytest.raises(LoraLabError, match="already exists.*set resume to 'latest'"):
        _train(make_config, base_model, two_bucket_dataset)


@pytest.mark.parametrize(("adapter", "optimizer"), [("loha", "adamw"), ("lokr", "adamw"), ("dora", "adamw"),
                                                    ("lora", "adafactor"),
                                                    ("lora", "lion"), ("lora", "adamw_schedulefree"),
                                                    ("lora", "prodigy_schedulefree")])
def test_each_adapter_type_and_optimizer_trains_and_resumes_exactly(adapter, optimizer, make_config, base_model,
                                                                    two_bucket_dataset, monkeypatch):
    """The adapter types and the optimizers added with the optimizer table keep the resume contract:
    stopped, then resumed, a run ends bit for bit where the unbroken one does."""
    from lora_lab.trainer import loop

    built = []
    real = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda config, model: built.append(real(config, model)) or built[-1])
    settings = {"adapter": adapter, "optimizer": optimizer}
    if optimizer.endswith("schedulefree"):  # no schedule; the optimizer's own warm-up (Prodigy's has none)
        settings.update(lr_scheduler="constant", warmup_steps=0 if optimizer.startswith("prodigy") else 3)
    unbroken = _train(make_config, base_model, two_bucket_dataset, name="unbroken", **settings)
    first = _train(make_config, base_model, two_bucket_dataset, StopAt(5), **settings)
    assert first.stopped and first.checkpoints[-1].step == 5
    resumed = _train(make_config, base_model, two_bucket_dataset, resume="latest", **settings)
    expected = {"adamw": "AdamW", "adafactor": "Adafactor", "lion": "Lion", "adamw_schedulefree": "AdamWScheduleFree",
                "prodigy_schedulefree": "ProdigyPlusScheduleFree"}[optimizer]
    assert {type(o).__name__ for o in built} == {expected}  # the setting takes effect
    role = {"loha": "hada_w1_a", "lokr": "lokr_w1", "dora": "dora_scale"}.get(adapter, "lora_A")
    assert any(f".{role}" in name for name in _final_weights(resumed))
    _assert_same(resumed, unbroken)


def test_a_schedule_free_run_saves_the_weights_it_evaluates(make_config, base_model, two_bucket_dataset,
                                                           monkeypatch):
    """A schedule-free optimizer steps one sequence of weights and evaluates another: the files hold
    the evaluated ones (the model ends in eval mode with exactly the final file's weights, and its
    training weights differ), and settings it has no use for are refused, saying why."""
    from lora_lab.trainer import loop
    from lora_lab.trainer.lora import named_lora_parameters

    built = []
    real = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda config, model: built.append(real(config, model)) or built[-1])
    result = _train(make_config, base_model, two_bucket_dataset, name="free", optimizer="adamw_schedulefree",
                    lr_scheduler="constant", warmup_steps=0)
    evaluated = {name: p.detach().clone() for name, p in named_lora_parameters(result.model)}
    saved = _final_weights(result)
    gap = max((evaluated[name] - saved[name]).abs().max().item() for name in evaluated)
    built[-1].train()
    stepped = max((p.detach() - saved[name]).abs().max().item() for name, p in named_lora_parameters(result.model))
    assert gap < 1e-6 < stepped  # saved: the evaluated weights (to rounding), not the stepped ones
    for setting, message in [({"lr_scheduler": "cosine"}, "schedule-free .* set lr_scheduler to constant"),
                             ({"optimizer": "prodigy_schedulefree", "warmup_steps": 3},
                              "no warm-up; set warmup_steps to 0")]:
        with pytest.raises(LoraLabError, match=message):
            make_config(**{"optimizer": "adamw_schedulefree", "lr_scheduler": "constant", **setting})


@pytest.mark.parametrize("family", ["flux", "zimage", "flux2"])
def test_each_transformer_family_resumes_exactly(family, two_bucket_dataset, tmp_path):
    """The transformer families' own state (their text rows, their flow shift) resumes as SD's does."""
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.run import load_base_model

    from .tiny_models import build

    folder = build(family, tmp_path / family)
    model = load_base_model(build_config({"base_model": str(folder)}), torch.device("cpu"))
    settings = {**SETTINGS, "steps": 6, "save_every": 3, "min_snr_gamma": 0.0, "resolution": 64,
                "base_model": str(folder), "dataset": str(two_bucket_dataset)}

    def run(out: str, events=None, **extra):
        config = build_config({**settings, "output_dir": str(tmp_path / out), **extra})
        return train_lora(config, events, model=copy.deepcopy(model))

    unbroken = run("unbroken")
    assert run("stopped", StopAt(2)).stopped
    resumed = run("stopped", resume="latest")
    assert resumed.checkpoints[-1].step == 6
    _assert_same(resumed, unbroken)
