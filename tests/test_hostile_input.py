"""Fuzz-style checks with broken and hostile files: malformed images and captions in a dataset,
malformed LoRA files. Each one is reported by name or read correctly; nothing crashes."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from lora_lab.trainer.data import scan_folder
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.examples import TrainingSet
from lora_lab.trainer.lora_files import check_lora
from lora_lab.trainer.resume import read_state
from PIL import Image
from safetensors.torch import save_file


def _png(size=(64, 64), mode="RGB", color=(200, 40, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (64, 48), (10, 200, 30, 0) if mode == "CMYK" else (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def _animated(kind: str) -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buffer, kind, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def _sixteen_bit() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("I;16", (64, 64), bytes(range(256)) * 32).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A few KB that claim 9000 x 9000 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _huge_text_chunk() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (20 * 2**20), zip=True)  # beyond PIL's limit for text chunks
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


# name -> (file bytes, caption bytes or None, expected: "ok" or a fragment of the warning)
BAD_IMAGES = {
    "zero_byte.png": (b"", None, "not a readable image"),
    "truncated.png": (_png()[:60], None, "not a readable image"),
    "truncated.jpg": (_jpeg()[:300], None, "not a readable image"),
    "text_file.jpg": (b"this is not an image\n" * 10, None, "not a readable image"),
    "html_page.webp": (b"<html><body>404 Not Found</body></html>", None, "not a readable image"),
    "bomb.png": (_bomb(), None, "too large to be a training image"),
    "text_chunk_bomb.png": (_huge_text_chunk(), None, "not a readable image"),
    "png_named.jpg": (_png(), None, "ok"),  # wrong extension, real image: read by its content
    "cmyk.jpg": (_jpeg("CMYK"), None, "ok"),
    "sixteen_bit.png": (_sixteen_bit(), None, "ok"),
    "animated.png": (_animated("PNG"), None, "ok"),  # first frame
    "animated.webp": (_animated("WEBP"), None, "ok"),
    "grayscale.png": (_png(mode="L"), None, "ok"),
    "tall_thin.png": (_png(size=(8, 2000)), None, "ok"),
}
BAD_CAPTIONS = {
    "binary_caption.png": (_png(), b"\x81\x8d\x8f\x90\x9d", "caption binary_caption.txt is not text"),
    "huge_caption.png": (_png(), b"word " * 20000, "caption huge_caption.txt is over 64 KB"),
    "nul_caption.png": (_png(), b"zkw thing\x00\x00, red\x1b[31m", "ok"),
    "utf16_no_bom.png": (_png(), "zkw thing, naïve".encode("utf-16-le"), "ok"),
    "empty_caption.png": (_png(), b"", "ok"),
}


def test_broken_images_and_captions_are_reported_by_name_and_the_rest_trains(tmp_path, fresh_model):
    cases = {**BAD_IMAGES, **BAD_CAPTIONS}
    for name, (content, caption, _) in cases.items():
        (tmp_path / name).write_bytes(content)
        if caption is not None:
            (tmp_path / name).with_suffix(".txt").write_bytes(caption)
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name is not an image
    dataset = scan_folder(tmp_path)
    loaded = {item.path.name: item for item in dataset.items}
    report = []
    for name, (_, _, expected) in cases.items():
        if expected == "ok":
            assert name in loaded, name
            report.append(f"{name}: read")
        else:
            stem = Path(name).stem
            warning = next(w for w in dataset.warnings if w.startswith((f"Skipped {name}", f"Skipped {stem}:")))
            assert expected in warning, (name, warning)
            assert name not in loaded
            report.append(f"{name}: {warning}")
    assert loaded["nul_caption.png"].caption == "zkw thing  , red [31m"
    assert loaded["utf16_no_bom.png"].caption == "zkw thing, naïve"
    print(f"\n{len(cases)} bad images and captions:\n" + "\n".join(report))
    # Everything that was accepted encodes and forms batches.
    examples = TrainingSet(fresh_model, dataset, 64, True, True, "", False)
    assert len(examples.examples) == len(loaded)
    assert all(torch.isfinite(e.latents).all() for e in examples.examples)


def _safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _good_lora(path: Path, **extra: torch.Tensor) -> None:
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_x.alpha": torch.tensor(4.0), **extra}, str(path), metadata={"ss_network_dim": "4"})


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_LORAS = {
    "zero_byte": (b"", "too short"),
    "seven_bytes": (b"\x01" * 7, "too short"),
    "header_longer_than_file": (_safetensors({}, length=2**62), "header claims"),
    "header_not_json": (struct.pack("<Q", 9) + b"{not json", "not valid JSON"),
    "header_not_utf8": (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "not valid JSON"),
    "header_is_a_list": (_safetensors([1, 2]), "not a JSON object"),
    "unknown_dtype": (_safetensors({"a": {**F32, "dtype": "F128"}}, bytes(16)), "unknown type"),
    "negative_shape": (_safetensors({"a": {**F32, "shape": [-2, -2]}}, bytes(16)), "malformed shape"),
    "float_shape": (_safetensors({"a": {**F32, "shape": [2.0, 2]}}, bytes(16)), "malformed shape"),
    "huge_shape": (_safetensors({"a": {**F32, "shape": [2**40, 2**40]}}, bytes(16)), "elements"),
    "offsets_past_end": (_safetensors({"a": {**F32, "data_offsets": [0, 16]}}, bytes(8)), "outside the file"),
    "bytes_disagree_with_shape": (_safetensors({"a": {**F32, "data_offsets": [0, 8]}}, bytes(16)),
                                  "but 8 bytes"),
    "overlapping_tensors": (_safetensors({"a": F32, "b": F32}, bytes(16)), "overlap"),
    "missing_fields": (_safetensors({"a": {"dtype": "F32"}}, bytes(16)), "malformed entry"),
    "metadata_not_text": (_safetensors({"__metadata__": {"ss_steps": 5}, "a": F32}, bytes(16)),
                          "metadata is not a map of text"),
    "metadata_huge": (_safetensors({"__metadata__": {"x": "y" * (17 * 2**20)}, "a": F32}, bytes(16)),
                      "metadata is implausibly large"),
    "no_tensors": (_safetensors({"__metadata__": {}}), "no tensors"),
}


@pytest.mark.parametrize("name", sorted(BAD_LORAS))
def test_malformed_lora_files_are_refused_by_name(tmp_path, name):
    content, expected = BAD_LORAS[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraLabError, match=rf"{name}.safetensors is not a usable LoRA file: .*{expected}"):
        check_lora(path)


@pytest.mark.parametrize("extra, expected", [
    ({"lora_unet_y.lora_down.weight": torch.zeros(4, 8)}, "only one of its two halves"),
    ({"lora_unet_y.lora_down.weight": torch.zeros(4, 8), "lora_unet_y.lora_up.weight": torch.zeros(8, 3)},
     "halves that do not fit"),
    ({"lora_unet_y.lora_down.weight": torch.zeros(8), "lora_unet_y.lora_up.weight": torch.zeros(8, 8)},
     "halves that do not fit"),
    ({"lora_unet_y.alpha": torch.zeros(3)}, "should be one number"),
])
def test_inconsistent_lora_layers_are_refused(tmp_path, extra, expected):
    path = tmp_path / "odd.safetensors"
    _good_lora(path, **extra)
    with pytest.raises(LoraLabError, match=expected):
        check_lora(path)


def test_only_safetensors_is_ever_read(tmp_path):
    good = tmp_path / "good.safetensors"
    _good_lora(good)
    assert check_lora(good)["__metadata__"] == {"ss_network_dim": "4"}
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(good.read_bytes())
    with pytest.raises(LoraLabError, match="only .safetensors files are read"):
        check_lora(pickle)
    resume = tmp_path / "run.resume"
    resume.write_bytes(_safetensors({"a": {**F32, "data_offsets": [0, 8]}}, bytes(16)))
    with pytest.raises(LoraLabError, match="not a usable LoRA file: tensor 'a' has shape"):
        read_state(resume)
