"""Render the Templates browser's thumbnail of each example (`example_workflows/<name>.jpg`): what the
workflow makes, with a line saying what it does (the frontend shows a custom node's template file
name as both title and description, so the picture has to say the rest).

    python scripts/render_example_thumbnails.py

The pictures are real results of the trainer the nodes call, on the embedded demo model (a ring
LoRA trained in a minute on a CPU): its checkpoint x strength grid, the same checkpoints compared by
strength, and two of its LoRAs stacked. FLUX.1-dev, Z-Image and FLUX.2 cannot run on a machine
without a GPU of their size, so their cards show the workflow's steps instead of a result.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from build_example_workflows import (
    COMPARE_LORAS,
    STACK_TWO,
    TRAIN_AND_TEST,
    TRAIN_FLUX,
    TRAIN_FLUX2,
    TRAIN_ZIMAGE,
    example_path,
)
from PIL import Image, ImageDraw, ImageFont

THUMBNAIL_SIDE = 768  # square, as the Templates browser's cards are
CAPTION = 150  # the band for the title and what the workflow does


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def card(title: str, says: str, picture: Image.Image | None, path: Path) -> None:
    """A thumbnail: the result fitted below a caption band with the title and what it does."""
    from lora_lab.trainer.sampling import wrap_text

    sheet = Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), (32, 34, 38))
    draw = ImageDraw.Draw(sheet)
    draw.text((24, 18), title, fill="white", font=font(34))
    for number, line in enumerate(wrap_text(says, font(22), THUMBNAIL_SIDE - 48)[:3]):
        draw.text((24, 66 + 26 * number), line, fill=(200, 204, 210), font=font(22))
    if picture is not None:
        room = (THUMBNAIL_SIDE - 32, THUMBNAIL_SIDE - CAPTION - 16)
        picture = picture.copy()
        picture.thumbnail(room, Image.Resampling.LANCZOS)
        sheet.paste(picture, ((THUMBNAIL_SIDE - picture.width) // 2, CAPTION + (room[1] - picture.height) // 2))
    sheet.save(path, quality=90)
    print(f"wrote {path.name}")


def steps_picture(steps: list[str]) -> Image.Image:
    """The workflow's path as boxes and arrows, for a card without a result."""
    picture = Image.new("RGB", (700, 560), (32, 34, 38))
    draw = ImageDraw.Draw(picture)
    for index, text in enumerate(steps):
        top = 20 + index * 108
        draw.rounded_rectangle((120, top, 580, top + 72), radius=12, fill=(58, 62, 70), outline=(120, 160, 220))
        draw.text((350, top + 36), text, fill="white", font=font(24), anchor="mm")
        if index < len(steps) - 1:
            draw.line((350, top + 72, 350, top + 104), fill=(120, 160, 220), width=4)
    return picture


def main() -> None:
    from lora_lab.trainer.cli import DEMO_SETTINGS
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.run import train_lora
    from lora_lab.trainer.sampling import fill_trigger, sample_grid

    with tempfile.TemporaryDirectory() as folder:
        result = train_lora(build_config({**DEMO_SETTINGS, "output_dir": folder}))
        prompts = [fill_trigger(p, result.trigger_words) for p in DEMO_SETTINGS["prompts"]]
        size = (result.config.data.resolution,) * 2
        rows = [(f"step {c.step}", c.path) for c in result.checkpoints]
        trained, _ = sample_grid(result.model, rows, prompts[:2], (0.0, 0.5, 1.0), size, 20, 5.0, 1)
        compare, _ = sample_grid(result.model, [(f"LoRA at step {c.step}", c.path) for c in result.checkpoints[::2]],
                                 prompts[:1], (0.0, 0.4, 0.7, 1.0), size, 20, 5.0, 2)
        # Two LoRAs of the run stacked at the guide's strengths (0.7 and 0.5) against each alone.
        stacked, _ = sample_grid(result.model, [("first alone", rows[0][1]), ("second alone", rows[-1][1])],
                                 prompts[2:], (0.5, 0.7), size, 20, 5.0, 3)
    card(TRAIN_AND_TEST.name, "Checks the dataset, trains with the guide's presets, shows the loss and samples as it "
         "goes, then a checkpoint x strength grid and the LoRA applied to your own prompt.", trained,
         example_path(TRAIN_AND_TEST).with_suffix(".jpg"))
    card(COMPARE_LORAS.name, "One row per LoRA file, one column per strength, the same seed in every cell: see "
         "which LoRA and which strength to use.", compare, example_path(COMPARE_LORAS).with_suffix(".jpg"))
    card(STACK_TWO.name, "Applies two LoRAs at the guide's stacking strengths, puts both trigger words in your "
         "prompt, and grids the pair across the guide's strength ranges.", stacked,
         example_path(STACK_TWO).with_suffix(".jpg"))
    card(TRAIN_FLUX.name, "From the separate transformer (fp8), CLIP-L + T5-XXL and VAE files: dataset, "
         "sentence captions, training, a grid with FLUX guidance, then the LoRA in your own FLUX sampler.",
         steps_picture(["Load Dataset + Caption (sentences)", "Train LoRA (fp8 base)", "Sample Checkpoint (grid)",
                        "Apply LoRA Stack", "Your sampler (guidance 3.5)"]),
         example_path(TRAIN_FLUX).with_suffix(".jpg"))
    card(TRAIN_ZIMAGE.name, "From the separate Z-Image model, Qwen3-4B (type lumina2) and VAE files: dataset, "
         "sentence captions, training, a grid, then the LoRA in your own sampler (cfg 4, with a negative).",
         steps_picture(["Load Dataset + Caption (sentences)", "Train LoRA", "Sample Checkpoint (grid)",
                        "Apply LoRA Stack", "Your sampler (cfg 4)"]),
         example_path(TRAIN_ZIMAGE).with_suffix(".jpg"))
    card(TRAIN_FLUX2.name, "From the separate FLUX.2 [klein] base model, Qwen3-4B (type flux2) and FLUX.2 VAE "
         "files: dataset, sentence captions, training, a grid, then the LoRA in your own sampler (cfg 4).",
         steps_picture(["Load Dataset + Caption (sentences)", "Train LoRA", "Sample Checkpoint (grid)",
                        "Apply LoRA Stack", "Your sampler (cfg 4)"]),
         example_path(TRAIN_FLUX2).with_suffix(".jpg"))


if __name__ == "__main__":
    main()
