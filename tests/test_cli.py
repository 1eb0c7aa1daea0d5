"""The command line: every setting documented, the demo writing what it promises, and errors
that say what to do with a non-zero exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_lab.trainer.cli import build_parser, main
from lora_lab.trainer.config import field_specs


def test_help_documents_every_setting_with_default_and_range(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in field_specs():
        assert "--" + name.replace("_", "-") in text
    assert "the preset's: 16 for style, 32 otherwise" in text and "Default: 0. Range: 0 to 256." in text  # rank
    assert ("Choices: adamw, adamw8bit, prodigy, adafactor, lion, adamw_schedulefree, prodigy_schedulefree."
            in text)


def test_demo_writes_checkpoints_loss_curve_and_grid(tmp_path, capsys, monkeypatch):
    import os
    import stat

    renamed = []  # every file written through a temporary file and a rename
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(Path(target).name)
                        or real_replace(source, target))
    old = os.umask(0o022)  # the usual umask: files other users (a ComfyUI service) can read
    try:
        code = main(["demo", "--steps", "4", "--save-every", "2", "--output-dir", str(tmp_path),
                     "--strengths", "0,1", "--prompts", "{trigger}, gray background", "--sample-steps", "2"])
    finally:
        os.umask(old)
    assert code == 0
    run_dir = tmp_path / "zkw_toy"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["zkw_toy-grid.png", "zkw_toy-loss.csv", "zkw_toy-loss.png", "zkw_toy-run.json",
                     "zkw_toy-step000002-samples.png", "zkw_toy-step000002.resume", "zkw_toy-step000002.safetensors",
                     "zkw_toy-step000004-samples.png", "zkw_toy.resume", "zkw_toy.safetensors"]
    assert set(names) <= set(renamed)  # none written in place: a crash leaves the old file or the new one
    assert {stat.S_IMODE((run_dir / name).stat().st_mode) for name in names} == {0o644}
    out = capsys.readouterr().out
    assert "Concept (a blue ring around a red dot) at strength 1: in" in out and "Loss curve diagnosis" in out


def test_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["train", "--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    assert "does not exist; check the path" in capsys.readouterr().err
    assert main(["train", "--rank", "-1"]) == 2
    assert "rank = -1 is out of range" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    process = subprocess.Popen([sys.executable, "-m", "lora_lab", "demo", "--steps", "5000", "--save-every", "4000",
                                "--output-dir", str(tmp_path), "--no-samples"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    loss_log = tmp_path / "zkw_toy" / "zkw_toy-loss.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not loss_log.exists() or len(loss_log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    saved = sorted((tmp_path / "zkw_toy").glob("zkw_toy-step*.safetensors"))
    assert len(saved) == 1 and load_file(str(saved[0]))
    assert "Stopped at step" in output and str(saved[0]) in output


def test_no_samples_means_none_while_training_either():
    from lora_lab.trainer.cli import gather_settings

    assert gather_settings(build_parser().parse_args(["demo", "--no-samples"]))["sample_every"] == -1
    chosen = build_parser().parse_args(["demo", "--no-samples", "--sample-every", "50"])
    assert str(gather_settings(chosen)["sample_every"]) == "50"  # an explicit flag still wins
    assert "sample_every" not in gather_settings(build_parser().parse_args(["demo"]))


def test_train_again_from_a_lora_takes_its_settings_onto_a_new_dataset(concept_run, tmp_path, capsys):
    """`train --from-lora FILE --dataset NEW`: the file's settings (its preset, rank, targets,
    learning rate, Min-SNR...) train on the new images; the flags win; the changes are listed."""
    import json
    import shutil

    from lora_lab.trainer import embedded
    from lora_lab.trainer.files import read_metadata

    new = tmp_path / "new_set" / "5_zkw_toy"
    new.mkdir(parents=True)
    for image in sorted(embedded.CONCEPT_DATASET.glob("*/*.png"))[:4]:
        shutil.copy(image, new)
        shutil.copy(image.with_suffix(".txt"), new)
    code = main(["train", "--from-lora", str(concept_run.final_path), "--dataset", str(new.parent), "--steps", "2",
                 "--save-every", "2", "--output-dir", str(tmp_path / "out"), "--no-samples"])
    assert code == 0
    said = capsys.readouterr().out
    assert "Training again from concept.safetensors" in said
    assert "steps: 300 → 2" in said and "dataset: '' → 'new_set'" in said
    assert "name: 'concept' → 'concept_again'" in said
    old = json.loads(read_metadata(concept_run.final_path)["lora_lab.config"])
    again_file = tmp_path / "out" / "concept_again" / "concept_again.safetensors"
    again = json.loads(read_metadata(again_file)["lora_lab.config"])
    for section, name in (("lora", "rank"), ("lora", "targets"), ("optimizer", "learning_rate"),
                          ("train", "min_snr_gamma"), ("train", "batch_size"), ("sample", "prompts")):
        assert again[section][name] == old[section][name], name
    assert again["train"]["steps"] == 2 and again["data"]["dataset"] == "new_set"


def test_train_again_refuses_what_it_cannot_do_and_says_what_is_missing(concept_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    foreign = tmp_path / "kohya.safetensors"  # the tensors, with kohya's metadata only
    save_file(load_file(concept_run.final_path), str(foreign), {"ss_network_dim": "32", "ss_output_name": "x"})
    import json

    from lora_lab.trainer.files import read_metadata

    metadata = read_metadata(concept_run.final_path)
    config = json.loads(metadata["lora_lab.config"])
    config["model"]["base_model"] = "my_sd15.safetensors"  # trained on a file of the user's: only its name kept
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file(load_file(concept_run.final_path), str(elsewhere), {**metadata, "lora_lab.config": json.dumps(config)})
    cases = [
        (["--from-lora", str(foreign), "--dataset", str(tmp_path)], "lora_lab.config"),
        (["--from-lora", str(elsewhere), "--dataset", str(tmp_path)], "trained on my_sd15.safetensors"),
        (["--from-lora", str(concept_run.final_path)], "give --dataset FOLDER"),
        (["--from-lora", str(tmp_path / "nope.safetensors"), "--dataset", str(tmp_path)], "no such file"),
    ]
    for flags, expected in cases:
        assert main(["train", *flags]) == 2
        assert expected in capsys.readouterr().err, flags
