"""Captions: the guide's own examples through the style rules, the trigger word placed as the
guide asks, caption dropout and tag shuffle as training sees them, the Caption node's edit
round-trip and .bak files, writes that stay inside the allowed folders, and automatic captions
from a (tiny, random) BLIP model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_lab.trainer.captions import CaptionVariation, recaption, with_trigger
from lora_lab.trainer.data import Dataset, ImageItem, scan_folder
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.examples import TrainingSet
from PIL import Image

from .tiny_models import build_blip

# The guide's "Quick Caption Guide by Model" and "Caption Format" examples.
SD15 = "xyz_style, digital art, landscape, mountains, sunset, vibrant colors"
SDXL = "xyz_style digital painting of mountains at sunset, vibrant colors, detailed"
FLUX = "A beautiful mountain landscape at sunset in the xyz_style, with vibrant orange and purple colors"


@pytest.mark.parametrize(("caption", "style", "expected"), [
    (SD15, "tags", SD15),  # each example is already right for its own family
    (SDXL, "mixed", SDXL),
    (FLUX, "natural", FLUX + "."),
    (FLUX, "tags", "xyz_style, beautiful mountain landscape, sunset, vibrant orange, purple colors"),
    (SDXL, "tags", "xyz_style, digital painting, mountains, sunset, vibrant colors, detailed"),
    (SD15, "natural", "xyz_style, digital art, landscape, mountains, sunset and vibrant colors."),
    (SDXL, "natural", "xyz_style, digital painting of mountains at sunset, vibrant colors and detailed."),
    ("digital art, landscape, xyz_style, sunset", "tags", "xyz_style, digital art, landscape, sunset"),
    ("XYZ_STYLE xyz_style digital art.", "tags", "xyz_style, digital art"),  # exactly once, spelled as given
    ("Xyz_Style, red hair, smiling", "natural", "xyz_style, red hair and smiling."),
    ("A cat on a mat", "natural", "xyz_style, a cat on a mat."),  # missing: put first
    ("mountains at sunset", "mixed", "xyz_style mountains at sunset"),
    ("", "tags", "xyz_style"),
    ("not_xyz_style_here, red", "tags", "xyz_style, not_xyz_style_here, red"),  # only whole words count
])
def test_the_guides_caption_styles(caption, style, expected):
    assert with_trigger(caption, "xyz_style", style) == expected


def test_the_guides_caption_format_example_as_tags():
    example = "xyz_character woman with red hair, smiling, casual clothes, outdoor setting"
    assert with_trigger(example, "xyz_character", "tags") == (
        "xyz_character, woman, red hair, smiling, casual clothes, outdoor setting")


def _item(name, caption, captioned=True, folder="", size=(40, 30)):
    return ImageItem(Path(name), caption, 1, folder, size, captioned, image=Image.new("RGB", size))


def test_recaption_applies_edits_then_the_captioner_then_the_template():
    dataset = Dataset(items=[_item("a.png", "red hair"), _item("b.png", "", captioned=False),
                             _item("c.png", "old text"), _item("d.png", "", False, "5_x", (20, 20))])
    captioner_calls = []

    def captioner(image):
        captioner_calls.append(image.size)
        return "a photo of a woman"

    result = recaption(dataset, "sks_person", "sd15", "{trigger}, photo of {name}", captioner,
                       edits={"c.png": "smiling, blue dress"})
    assert [i.caption for i in result.items] == ["sks_person, red hair", "sks_person, photo, woman",
                                                 "sks_person, smiling, blue dress", "sks_person, photo, woman"]
    assert captioner_calls == [(40, 30), (20, 20)]  # only the images without a caption
    plain = recaption(dataset, "sks_person", "sd15", "{trigger}, photo of {name}", edits={"5_x/d.png": "x"})
    assert [i.caption for i in plain.items[1:]] == ["sks_person, photo of b", "sks_person, old text", "sks_person, x"]
    assert dataset.items[2].caption == "old text"  # the input is not changed
    everything = recaption(dataset, "sks_person", "flux", "{trigger}", captioner, replace_existing=True)
    assert {i.caption for i in everything.items} == {"sks_person, a photo of a woman."}


def test_caption_dropout_and_tag_shuffle_as_training_sees_them():
    variation = CaptionVariation(dropout=0.25, shuffle=True, keep=1, seed=3)
    caption = "xyz_style, red hair, smiling, blue dress, park"
    seen = [variation.apply(caption, batch, 0) for batch in range(400)]
    dropped = seen.count("")
    assert 70 <= dropped <= 130  # about a quarter
    kept = [c for c in seen if c]
    assert all(c.startswith("xyz_style, ") and sorted(c.split(", ")) == sorted(caption.split(", ")) for c in kept)
    assert len(set(kept)) > 10  # really shuffled
    assert seen == [variation.apply(caption, batch, 0) for batch in range(400)]  # the same again (exact resume)
    assert CaptionVariation().apply(caption, 5, 0) == caption  # off by default


def test_training_batches_get_the_varied_captions(fresh_model):
    from lora_lab.trainer import embedded

    dataset = scan_folder(embedded.CONCEPT_DATASET)
    encoded: list[list[str]] = []
    original = fresh_model.encoders.encode_prompts

    def spy(captions):
        encoded.append(list(captions))
        return original(captions)

    fresh_model.encoders.encode_prompts = spy
    dropping = TrainingSet(fresh_model, dataset, 64, True, True, "", False, CaptionVariation(dropout=0.5, seed=1))
    assert dropping.cache_text and [""] in encoded  # the empty caption is encoded once, with the others
    empty = dropping.empty_conditioning["prompt_embeds"]
    square = [i for i, example in enumerate(dropping.examples) if example.bucket == (64, 64)]
    latents, conditioning = dropping.batch(square, torch.float32, batch_number=7)
    dropped = [torch.equal(row, empty) for row in conditioning["prompt_embeds"]]
    expected = [CaptionVariation(dropout=0.5, seed=1).apply(dropping.examples[index].caption, 7, position) == ""
                for position, index in enumerate(square)]
    assert dropped == expected and any(dropped) and not all(dropped)
    encoded.clear()
    shuffling = TrainingSet(fresh_model, dataset, 64, True, True, "", False,
                            CaptionVariation(shuffle=True, keep=0, seed=1))
    assert not shuffling.cache_text and encoded == []  # shuffled captions are encoded per batch
    shuffling.batch(square, torch.float32, batch_number=2)
    orders = {caption.split(", ")[0] for caption in encoded[0]}
    assert orders > {"zkw_toy"}  # with keep_tokens 0 the trigger is shuffled too
    shuffling.batch(square[:1], torch.float32)  # without a batch number (validation): as written
    assert encoded[-1] == [dataset.items[square[0]].caption]


# --- the Caption node --------------------------------------------------------------------------


@pytest.fixture
def caption_node(nodes):
    from lora_lab.nodes.caption import Caption

    return Caption


def _dataset_value(folder: Path, lora_type: str = "style", family: str = ""):
    from lora_lab.nodes.values import DatasetValue

    return DatasetValue(scan_folder(folder), str(folder), "x", lora_type, family)


def _small_set(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{index}.png")
    (folder / "img0.txt").write_text("zkw_toy, red square\n")
    (folder / "img1.txt").write_text("blue square, zkw_toy\n")
    return folder


def test_caption_node_edits_round_trip_and_keeps_the_old_text(caption_node, stubs, tmp_path):
    folder = _small_set(tmp_path / "input" / "my_set")  # inside ComfyUI's input folder
    value = _dataset_value(folder)
    _, text = caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, "", False).values
    assert text.splitlines() == ["img0.png: zkw_toy, red square", "img1.png: zkw_toy, blue square",
                                 "img2.png: zkw_toy"]
    edited = text.replace("img2.png: zkw_toy", "img2.png: zkw_toy, green square, plain")
    out, text2 = caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, edited, True).values
    assert (folder / "img2.txt").read_text() == "zkw_toy, green square, plain\n"
    assert (folder / "img1.txt").read_text() == "zkw_toy, blue square\n"
    assert (folder / "img1.txt.bak").read_text() == "blue square, zkw_toy\n"  # the previous text kept
    assert not (folder / "img0.txt.bak").exists()  # unchanged: nothing to keep
    assert not (folder / "img2.txt.bak").exists()  # there was no previous text
    assert scan_folder(folder).items[2].caption == "zkw_toy, green square, plain"  # read back as written
    with pytest.raises(LoraLabError, match="not in the dataset: nope.png"):
        caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, "nope.png: x", False)
    with pytest.raises(LoraLabError, match="is not 'image name: caption'"):
        caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, "just words", False)


def test_caption_node_takes_the_style_of_the_connected_model(caption_node, stubs, tmp_path, monkeypatch):
    from lora_lab.nodes import graph_model
    from lora_lab.trainer.families import get_family

    folder = _small_set(tmp_path / "input" / "set2")
    value = _dataset_value(folder)
    monkeypatch.setattr(graph_model, "family_of", lambda model: get_family("flux"))
    out, text = caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, "", False, model="MODEL").values
    assert text.splitlines()[0] == "img0.png: zkw_toy, red square."  # FLUX: sentences
    assert out.lora_type == "style" and out.family == "flux"
    _, text = caption_node.execute(_dataset_value(folder, family="sdxl"), "zkw_toy", "{trigger}", "none", False,
                                   "", False).values
    assert text.splitlines()[1] == "img1.png: blue square, zkw_toy"  # SDXL (from Load Dataset): mixed, kept


def test_caption_writes_stay_inside_the_allowed_folders(caption_node, stubs, tmp_path, monkeypatch):
    outside = _small_set(tmp_path / "elsewhere")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with pytest.raises(LoraLabError, match="may only write inside ComfyUI's input folder"):
        caption_node.execute(_dataset_value(outside), "zkw_toy", "{trigger}", "none", False, "", True)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # nothing written, nothing created
    # A link inside the input folder that leads out of it is refused too.
    link = tmp_path / "input" / "linked"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoraLabError, match="may only write inside"):
        caption_node.execute(_dataset_value(link), "zkw_toy", "{trigger}", "none", False, "", True)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    # A caption file that became a link out after the dataset was read is refused (a dataset read
    # with it skips that image: trainer/data.py).
    inside = _small_set(tmp_path / "input" / "set3")
    value = _dataset_value(inside)
    (inside / "img2.txt").unlink(missing_ok=True)
    (inside / "img2.txt").symlink_to(outside / "img0.txt")
    with pytest.raises(LoraLabError, match="never through a symbolic link"):
        caption_node.execute(value, "zkw_toy", "{trigger}", "none", False, "", True)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    # The machine's owner may allow a folder (an environment variable: a workflow cannot set it).
    monkeypatch.setenv("LORA_LAB_WRITABLE_FOLDERS", str(outside))
    caption_node.execute(_dataset_value(outside), "zkw_toy", "{trigger}", "none", False, "", True)
    assert (outside / "img2.txt").read_text() == "zkw_toy\n"


def test_automatic_captions_from_a_model_folder(caption_node, stubs, tmp_path):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.nodes.caption import Caption

    folder = _small_set(tmp_path / "input" / "set4")
    value = _dataset_value(folder)
    with pytest.raises(LoraLabError, match=r"captioners/tiny_blip is missing\. Put a BLIP captioning model folder"):
        Caption.execute(value, "zkw_toy", "{trigger}", "tiny_blip", False, "", False)
    build_blip(comfy_bridge.captioner_root() / "tiny_blip")
    options = next(i for i in Caption.define_schema().inputs if i.id == "captioner").options["options"]
    assert options == ["none", "tiny_blip"]  # the combo lists the model folders found
    _, text = Caption.execute(value, "zkw_toy", "{trigger}", "tiny_blip", False, "", False).values
    lines = text.splitlines()
    assert lines[:2] == ["img0.png: zkw_toy, red square", "img1.png: zkw_toy, blue square"]  # kept
    generated = lines[2].removeprefix("img2.png: ")
    assert generated.startswith("zkw_toy, ") and len(generated) > len("zkw_toy, ")  # trigger first, then words
    _, text = Caption.execute(value, "zkw_toy", "{trigger}", "tiny_blip", True, "", False).values
    assert all(line.split(": ", 1)[1].startswith("zkw_toy, ") for line in text.splitlines())
    assert "red square" not in text  # every caption rewritten by the captioner
