"""The dataset doctor on images generated with known faults: each faulty image is flagged with the
right reason and the clean ones are not. False positives and negatives per check are printed.

The generated set is the one the thresholds in trainer/doctor.py were chosen on: photo-like
pictures (shapes over a colour gradient, with texture at three scales) at 512-768 px, and the
same pictures blurred, dimmed, blown out, shrunk or copied."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from lora_lab.trainer.cli import main
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.doctor import examine, flagged_sheet
from PIL import Image, ImageDraw, ImageFilter

CLEAN = 12


def photo_like(rng: random.Random, size: tuple[int, int] = (640, 640)) -> Image.Image:
    width, height = size
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    start = np.array([rng.uniform(0.2, 0.7) for _ in range(3)], np.float32)
    slope = np.array([rng.uniform(-0.3, 0.3) for _ in range(3)], np.float32)
    picture = Image.fromarray((np.clip(start + slope * ramp, 0, 1).repeat(height, axis=0) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.randint(4, 12)):
        x, y, w, h = rng.randrange(width), rng.randrange(height), rng.randint(30, 260), rng.randint(30, 260)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    pixels = np.asarray(picture, np.float32) / 255
    noise_rng = np.random.default_rng(rng.randrange(2**31))
    for scale in (4, 16, 64):
        coarse = noise_rng.normal(0.5, rng.uniform(0.01, 0.06), (height // scale + 1, width // scale + 1))
        layer = Image.fromarray((np.clip(coarse, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        pixels = pixels + (np.asarray(layer, np.float32)[..., None] / 255 - 0.5)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def recompressed(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.resize((image.width * 9 // 10, image.height * 9 // 10)).save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


FAULTS = {  # name -> (what is done to a clean picture, the check that must flag it)
    "blurred": (lambda im, rng: im.filter(ImageFilter.GaussianBlur(rng.uniform(2.5, 5))), "blur"),
    "dark": (lambda im, rng: Image.fromarray((np.asarray(im, np.float32) * rng.uniform(0.12, 0.3)).astype(np.uint8)),
             "exposure"),
    "blown": (lambda im, rng: Image.fromarray(np.clip(np.asarray(im, np.float32) + rng.uniform(140, 200), 0,
                                                      255).astype(np.uint8)), "exposure"),
    "tiny": (lambda im, rng: im.resize((rng.randint(200, 380),) * 2, Image.Resampling.LANCZOS), "resolution"),
    "wide": (lambda im, rng: im.resize((1200, 512)), "aspect"),
}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A dataset folder: clean pictures, faulty ones, and a near-duplicate pair; name -> the check
    that must flag it ("" for clean)."""
    folder = tmp_path_factory.mktemp("doctor") / "set"
    folder.mkdir()
    rng = random.Random(7)
    expected = {}
    for index in range(CLEAN):
        photo_like(rng, (rng.choice([640, 768]), rng.choice([640, 768]))).save(folder / f"clean_{index:02d}.png")
        expected[f"clean_{index:02d}.png"] = ""
    for fault, (make, check) in FAULTS.items():
        for index in range(3):
            make(photo_like(rng), rng).save(folder / f"{fault}_{index}.png")
            expected[f"{fault}_{index}.png"] = check
    original = photo_like(rng)
    original.save(folder / "duplicate_a.png")
    recompressed(original).save(folder / "duplicate_b.jpg")
    expected.update({"duplicate_a.png": "duplicates", "duplicate_b.jpg": "duplicates"})
    for name in expected:
        (folder / name).with_suffix(".txt").write_text(f"xyz_thing, picture {name.split('.')[0].replace('_', ' ')}, "
                                                       "gradient background, shapes")
    return folder, expected


def test_each_fault_is_flagged_with_its_reason_and_clean_images_are_not(labelled):
    folder, expected = labelled
    report = examine(scan_folder(folder), "sd15", "object", "xyz_thing")
    flagged = report.flagged()
    checks = sorted({check for check in expected.values() if check})
    for check in checks:
        should = {name for name, wanted in expected.items() if wanted == check}
        got = {name for name, reasons in flagged.items() if check in reasons}
        print(f"{check}: {len(should - got)} missed of {len(should)}, {len(got - should)} false alarms")
        assert got == should, check
    assert not set(flagged) & {name for name, wanted in expected.items() if not wanted}
    assert not report.blocking


def test_caption_findings(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    rng = random.Random(3)
    captions = {"a": "style", "b": "red car, street, night", "c": "a photo of style in a garden with flowers",
                "d": None, "e": ""}
    for name, caption in captions.items():
        photo_like(rng).save(folder / f"{name}.png")
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption)
    report = examine(scan_folder(folder), "sd15", "style", "style", sample_prompts=("red car, street, night",))
    messages = "\n".join(f.message for f in report.findings)
    assert "ordinary word the model already knows" in messages  # "style" is one CLIP token
    assert "only the trigger word (a.png)" in messages
    assert "lack the trigger word 'style' (b.png" in messages
    assert "without a caption file (d.png)" in messages and "empty caption(s) (e.png)" in messages
    assert "do not start with the trigger word (c.png)" in messages
    assert "repeat a training caption word for word" in messages
    made_up = examine(scan_folder(folder), "sd15", "style", "zkw_toy")
    assert not any("ordinary word" in f.message for f in made_up.findings)
    flux = examine(scan_folder(folder), "flux", "style", "style")
    assert any(f.check == "style" and "b.png" in f.images for f in flux.findings)  # tags where FLUX wants prose


def test_variety_for_character_sets(tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    base = photo_like(random.Random(1))
    for index in range(6):  # the same framing, slightly brightened each time
        Image.fromarray(np.clip(np.asarray(base, np.int16) + 4 * index, 0, 255).astype(np.uint8)).save(
            folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"sks_person, photo {index}")
    report = examine(scan_folder(folder), "sd15", "character", "sks_person")
    assert report.of("variety") and report.of("duplicates")


def test_the_doctor_command_and_the_flagged_sheet(labelled, capsys, tmp_path):
    folder, expected = labelled
    assert main(["doctor", str(folder), "--lora-type", "object", "--trigger-word", "xyz_thing",
                 "--prompt", "{trigger}, picture clean 03, gradient background, shapes", "--prompt", "{trigger}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Ready to train, with") and "look blurry" in out
    assert "Sample prompt(s) xyz_thing, picture clean 03, gradient background, shapes repeat a training caption" in out
    sheet = flagged_sheet(scan_folder(folder), examine(scan_folder(folder), "sd15", "object", "xyz_thing"))
    assert sheet is not None and sheet.width == 4 * 160
    (tmp_path / "empty").mkdir()
    assert main(["doctor", str(tmp_path / "empty")]) == 1  # nothing to train on: a finding that stops training
    assert "No usable images" in capsys.readouterr().out


def test_the_doctor_never_writes(labelled):
    folder, _ = labelled
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    examine(scan_folder(folder), "flux", "character", "xyz_thing")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_the_worst_images_come_first_and_none_is_hidden(tmp_path):
    """Ten flagged images: the sheet shows the worst (a far too small and a very dark one) and says
    how many more there are; the report lists every flagged file; 40 px is not lumped with 96 px."""
    rng = random.Random(5)
    for index in range(9):  # small but not tiny: all flagged for resolution
        photo_like(rng, (96, 96)).save(tmp_path / f"a{index}_small.png")
    photo_like(rng, (40, 40)).save(tmp_path / "z_tiny.png")
    dark = photo_like(rng, (600, 600))
    Image.fromarray((np.asarray(dark, np.float32) * 0.15).astype(np.uint8)).save(tmp_path / "z_dark.png")
    for path in tmp_path.glob("*.png"):
        path.with_suffix(".txt").write_text("xyz_thing, a picture")
    dataset = scan_folder(tmp_path)
    report = examine(dataset, "sd15", "object", "xyz_thing")
    assert report.worst_first()[:2] == ["z_tiny.png", "z_dark.png"]
    unusable, tiny = report.of("unusable"), report.of("tiny")
    assert unusable[0].images == ("z_tiny.png",) and "z_tiny.png (40 px)" in unusable[0].message
    assert len(tiny[0].images) == 9 and "z_tiny.png" not in tiny[0].images and "(96 px)" in tiny[0].message
    text = report.text()
    for name in (*(f"a{index}_small.png" for index in range(9)), "z_tiny.png", "z_dark.png"):
        assert f"  {name}: " in text, name  # every flagged file, one a line
    sheet = flagged_sheet(dataset, report)
    assert sheet is not None and sheet.size == (4 * 160, 2 * (160 + 3 * 16 + 8))  # 7 shown and "+4 more"
