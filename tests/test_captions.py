"""Caption rules and the dataset quality report."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_lab.trainer.captions import recaption, to_style, with_trigger
from lora_lab.trainer.data import Dataset, ImageItem
from lora_lab.trainer.quality import quality_report


@pytest.mark.parametrize(("caption", "style", "expected"), [
    ("digital art, landscape, xyz_style, sunset", "tags", "xyz_style, digital art, landscape, sunset"),
    ("XYZ_STYLE xyz_style digital art.", "tags", "xyz_style, digital art"),
    ("A mountain at sunset in the xyz_style", "natural", "xyz_style A mountain at sunset in the."),
    ("mountains at sunset", "mixed", "xyz_style mountains at sunset"),
    ("", "tags", "xyz_style"),
    ("not_xyz_style_here, red", "tags", "xyz_style, not_xyz_style_here, red"),  # only whole words count
])
def test_trigger_exactly_once_and_first(caption, style, expected):
    assert with_trigger(caption, "xyz_style", style) == expected


def test_styles_are_lossless_tidying():
    assert to_style("red hair;  smiling, red hair.", "tags") == "red hair, smiling"
    assert to_style("a cat on a mat", "natural") == "a cat on a mat."
    assert to_style("a  cat", "mixed") == "a cat"


def _item(name, caption, captioned=True, size=(600, 600)):
    return ImageItem(Path(name), caption, 1, "", size, captioned)


def test_recaption_fills_missing_from_the_template():
    dataset = Dataset(items=[_item("a.png", "red hair"), _item("b.png", "", captioned=False)])
    result = recaption(dataset, "sks_person", "sd15", "{trigger}, photo of {name}")
    assert [i.caption for i in result.items] == ["sks_person, red hair", "sks_person, photo of b"]
    assert dataset.items[1].caption == ""  # the input is not changed


def test_quality_report_names_what_to_fix():
    items = [_item(f"{i}.png", "sks, smiling", size=(400, 600)) for i in range(8)]
    items.append(_item("plain.png", "no trigger here", captioned=False))
    report = quality_report(Dataset(items=items), "likeness", "sks", 512)
    assert report.startswith("3 problem(s)")
    assert "9 images: a likeness LoRA needs at least 20 (40-100 recommended)" in report
    assert "1 without a caption file: plain.png" in report
    assert "lack the trigger word 'sks': plain.png" in report
    assert "8 below 512 px" in report
    ready = quality_report(Dataset(items=[_item(f"{i}.png", "sks, x") for i in range(25)]), "style", "sks", 512)
    assert ready.startswith("Ready to train.")
