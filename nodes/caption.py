"""Caption: every caption gets the trigger word exactly once, first; missing captions come from a
template; captions are tidied to the family's style. Writes .txt sidecars only when asked."""

from __future__ import annotations

from ..trainer.captions import recaption
from ..trainer.errors import LoraLabError
from ..trainer.families import FAMILY_NAMES
from ..trainer.files import atomic_write_text
from .comfy_bridge import DATASET, io
from .values import DatasetValue


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabCaption", display_name="Caption", category="LoRA Lab",
            description="Make every caption start with the trigger word, fill missing ones, tidy the style.",
            inputs=[
                DATASET.Input("dataset", tooltip="From Load Dataset."),
                io.String.Input("trigger_word", default="", tooltip="A unique word like xyz_style (empty = the "
                                "dataset's N_name folder name)."),
                io.Combo.Input("family", options=list(FAMILY_NAMES), default=FAMILY_NAMES[0],
                               tooltip="Caption style: tags for SD 1.5, mixed for SDXL, sentences for FLUX."),
                io.String.Input("template", default="{trigger}", tooltip="Caption for images without one; "
                                "{trigger}, {name} (file name) and {folder} are filled in."),
                io.Boolean.Input("write_txt_files", default=False, tooltip="Also save the captions as .txt "
                                 "files next to the images (replacing the old ones)."),
            ],
            outputs=[DATASET.Output(display_name="dataset"), io.String.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, dataset: DatasetValue, trigger_word: str, family: str, template: str,
                write_txt_files: bool) -> io.NodeOutput:
        trigger = trigger_word.strip() or (dataset.dataset.trigger_words[0] if dataset.dataset.trigger_words else "")
        if not trigger:
            raise LoraLabError("Caption needs a trigger word: set trigger_word (e.g. xyz_style).")
        try:
            captioned = recaption(dataset.dataset, trigger, family, template)
        except (KeyError, IndexError, ValueError) as error:
            raise LoraLabError(f"template {template!r} has an unknown placeholder ({error}); use {{trigger}}, "
                               "{name} or {folder}.") from None
        if write_txt_files:
            if any(item.image is not None for item in captioned.items):
                raise LoraLabError("write_txt_files needs a dataset loaded from a folder, not graph images.")
            for item in captioned.items:
                atomic_write_text(item.path.with_suffix(".txt"), item.caption + "\n")
        text = "\n".join(f"{item.path.name}: {item.caption}" for item in captioned.items)
        value = DatasetValue(captioned, dataset.source, dataset.fingerprint + "|" + trigger + family + template)
        return io.NodeOutput(value, text, ui={"text": (text,)})
