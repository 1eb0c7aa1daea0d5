"""Datasets: folders, repeats, image modes, broken files and captions, buckets and batch order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lora_lab.trainer.data import (
    BatchOrder,
    bucket_sizes,
    choose_bucket,
    epoch_batches,
    load_image,
    prepare_image,
    scan_folder,
)
from lora_lab.trainer.errors import LoraLabError
from PIL import Image


def _image(path, size=(64, 64), colour=(200, 0, 0), mode="RGB", **save):
    Image.new(mode, size, colour).save(path, **save)
    return path


def test_repeat_folders_captions_and_trigger(tmp_path):
    (tmp_path / "10_xyz_style").mkdir()
    _image(tmp_path / "10_xyz_style" / "a.png")
    (tmp_path / "10_xyz_style" / "a.txt").write_text("xyz_style, red square\n", encoding="utf-8")
    _image(tmp_path / "top.jpg")
    (tmp_path / "top.txt").write_text("plain", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    dataset = scan_folder(tmp_path)
    by_name = {item.path.name: item for item in dataset.items}
    assert by_name["a.png"].repeats == 10 and by_name["a.png"].caption == "xyz_style, red square"
    assert by_name["top.jpg"].repeats == 1
    assert dataset.trigger_words == ["xyz_style"]
    assert any("notes" in warning for warning in dataset.warnings)
    assert dataset.tag_frequency()["10_xyz_style"] == {"xyz_style": 1, "red square": 1}


def test_missing_and_empty_folders_say_what_to_do(tmp_path):
    with pytest.raises(LoraLabError, match="does not exist; check the path"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(LoraLabError, match="No usable images.*Add images"):
        scan_folder(tmp_path)
    with pytest.raises(LoraLabError, match="No dataset folder given"):
        scan_folder("")


def test_corrupt_images_are_skipped_by_name_and_fatal_only_when_nothing_is_left(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(LoraLabError) as error:
        scan_folder(tmp_path)
    assert "broken.png" in str(error.value) and "empty.jpg" in str(error.value)
    _image(tmp_path / "good.png")
    dataset = scan_folder(tmp_path)
    assert [item.path.name for item in dataset.items] == ["good.png"]
    assert any("broken.png" in w and "Replace or remove it" in w for w in dataset.warnings)
    assert any("good.png has no caption" in w for w in dataset.warnings)


def test_truncated_image_is_skipped(tmp_path):
    data = (_image(tmp_path / "full.jpg", size=(256, 256), colour=(10, 200, 30))).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    dataset = scan_folder(tmp_path)
    assert [item.path.name for item in dataset.items] == ["full.jpg"]
    assert any("cut.jpg" in w for w in dataset.warnings)


def test_captions_in_other_encodings(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, crème".encode("cp1252"))
    _image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("naïve".encode("utf-16"))
    _image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes("\ufeffbom caption".encode())
    dataset = scan_folder(tmp_path)
    captions = {item.path.name: item.caption for item in dataset.items}
    assert captions == {"a.png": "café, crème", "b.png": "naïve", "c.png": "bom caption"}
    assert any("a.txt is not UTF-8" in w and "Re-save it as UTF-8" in w for w in dataset.warnings)
    _image(tmp_path / "d.png")
    (tmp_path / "d.txt").write_bytes(b"\x81\x8d\x8f\x90")  # undefined in Windows-1252 as well
    dataset = scan_folder(tmp_path)  # the image with an unreadable caption is skipped, by name
    assert "d.png" not in {item.path.name for item in dataset.items}
    assert any("Skipped d: its caption d.txt is not text" in w and "save it as UTF-8" in w for w in dataset.warnings)


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    gray16.save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    _image(tmp_path / "gray.png", mode="L", colour=100)
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (100, 100, 100)
    _image(tmp_path / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0))
    red, green, blue = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_buckets_keep_area_and_aspect():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    width, height = choose_bucket((1920, 1080), buckets)
    assert abs(math.log(width / height) - math.log(1920 / 1080)) < 0.15
    assert choose_bucket((1000, 1000), buckets) == (512, 512)
    wide = choose_bucket((96, 64), bucket_sizes(64, 8))
    assert wide[0] > wide[1]


def test_prepare_image_covers_and_crops(tmp_path):
    from lora_lab.trainer.data import ImageItem

    path = _image(tmp_path / "wide.png", size=(300, 100))
    prepared = prepare_image(ImageItem(path, "", 1, "", (300, 100)), (64, 32))
    assert prepared.pixels.shape == (3, 32, 64)
    assert prepared.original_size == (100, 300)
    assert float(prepared.pixels.min()) >= -1 and float(prepared.pixels.max()) <= 1


def test_batches_hold_one_bucket_and_are_reproducible():
    buckets = [(64, 64), (64, 64), (96, 48), (96, 48), (64, 64)]
    repeats = [2, 1, 1, 3, 1]
    batches = epoch_batches(buckets, repeats, batch_size=2, seed=7, epoch=0)
    assert sorted(i for b in batches for i in b) == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert batches == epoch_batches(buckets, repeats, batch_size=2, seed=7, epoch=0)
    assert batches != epoch_batches(buckets, repeats, batch_size=2, seed=7, epoch=1)
    order = BatchOrder(buckets, repeats, 2, 7)
    fresh = BatchOrder(buckets, repeats, 2, 7)
    sequence = [order.batch(n) for n in range(12)]
    assert fresh.batch(9) == sequence[9]  # any batch can be recomputed without replaying the others


def test_links_to_files_or_folders_outside_the_dataset_are_not_read(tmp_path):
    """A shared workflow names one dataset folder; a link inside it must not reach the rest of the disk."""
    secret = tmp_path / "private"
    secret.mkdir()
    _image(secret / "photo.png")
    (secret / "photo.txt").write_text("private caption")
    data = tmp_path / "data"
    (data / "5_xyz").mkdir(parents=True)
    _image(data / "own.png")
    (data / "own.txt").write_text("xyz, own")
    (data / "linked.png").symlink_to(secret / "photo.png")
    (data / "5_xyz" / "a.png").symlink_to(data / "own.png")  # a link that stays inside is fine
    _image(data / "caption_linked.png")
    (data / "caption_linked.txt").symlink_to(secret / "photo.txt")
    (data / "10_linked").symlink_to(secret, target_is_directory=True)
    dataset = scan_folder(data)
    assert sorted(item.path.name for item in dataset.items) == ["a.png", "own.png"]
    assert all("private caption" not in item.caption for item in dataset.items)
    for name in ("linked.png", "caption_linked.txt", "10_linked"):
        assert any(name in warning and "outside the dataset folder" in warning for warning in dataset.warnings)
