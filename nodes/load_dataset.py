"""Load Dataset: a folder of images + .txt captions (kohya N_name repeats honoured), or an IMAGE
batch from the graph with optional captions and masks; the dataset doctor's report on the node, as
text and as a sheet of the flagged images. The LoRA type chosen here travels with the dataset to
Train LoRA's preset, and a connected MODEL sets the family the doctor checks against. With lora_type
"regularisation" it loads the class images for Train LoRA's reg_dataset, and the report
checks them as such."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..trainer.data import IMAGE_EXTENSIONS, Dataset, dataset_from_images, scan_folder
from ..trainer.doctor import LORA_TYPES, examine, examine_regularisation, flagged_sheet
from ..trainer.errors import LoraLabError
from ..trainer.families import DEFAULT_FAMILY, get_family
from . import comfy_bridge as comfy
from . import graph_model, widget_history
from .comfy_bridge import DATASET, io
from .folders import resolve_dataset_folder
from .values import DatasetValue

_ASSUMED = get_family(DEFAULT_FAMILY)
REGULARISATION = "regularisation"  # a lora_type of its own: class images for Train LoRA's reg_dataset
NO_MODEL_NOTE = (f"· No MODEL connected: checked as {_ASSUMED.title} ({_ASSUMED.default_resolution} px, caption style: "
                 f"{_ASSUMED.caption_style}). Connect your checkpoint loader's MODEL to check against your model.")


def folder_fingerprint(folder: Path) -> str:
    """Changes when any image or caption is added, removed, resized or touched."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt") and path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabLoadDataset", display_name="Load Dataset", category="LoRA Lab",
            description="Images and captions to train a LoRA on, checked against the guide (the dataset doctor).",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of images with same-name .txt captions; "
                                "N_name subfolders repeat their images N times. A relative path is read from "
                                "ComfyUI's input folder. Leave empty to use the images input."),
                io.Combo.Input("lora_type", options=[*LORA_TYPES, REGULARISATION], default="style",
                               tooltip="What you are training. The report compares the image count with the "
                                       "guide's table for it, and Train LoRA's preset 'from dataset' uses it. "
                                       "regularisation: these are class images (e.g. photos of 'a woman' for a "
                                       "likeness LoRA) for Train LoRA's reg_dataset, so the LoRA keeps drawing the "
                                       "class as the base does; set trigger_word to the training set's, and the "
                                       "report checks that no caption has it."),
                io.String.Input("trigger_word", default="", tooltip="The trigger word, typed once here: the report "
                                "checks the captions for it, Caption puts it in them and Train LoRA records it and "
                                "fills {trigger} in sample prompts (empty = the N_name folder name, if there is one)."),
                io.Model.Input("model", optional=True, tooltip="Your base model (optional): the report checks "
                               "resolution and caption style against its family."),
                io.Image.Input("images", optional=True, tooltip="Train on these images instead of a folder."),
                io.String.Input("captions", optional=True, multiline=True, default="",
                                tooltip="One caption per line for the images input."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Masks for the images input (one per image, or one for all), for Train LoRA's "
                                      "masked_loss: 1 (white) = counts. LoadImage's MASK of a transparent PNG is 1 "
                                      "where it is transparent: put InvertMask between. A folder's masks are "
                                      "name_mask.png files, a masks/ folder or the images' alpha channels."),
            ],
            outputs=[DATASET.Output(display_name="dataset"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,  # its report can be made on its own, without queueing training
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **_: object) -> str:
        return folder_fingerprint(resolve_dataset_folder(folder)) if folder.strip() else ""

    @classmethod
    def execute(cls, folder: str, lora_type: str, trigger_word: str, model=None, images=None,
                captions: str = "", masks=None) -> io.NodeOutput:
        widget_history.note_removed_inputs("LoraLabLoadDataset", cls.hidden.prompt, cls.hidden.unique_id)
        if folder.strip():
            if masks is not None:
                raise LoraLabError("The masks input goes with the images input; a folder's masks are name_mask.png "
                                   "files beside its images, a masks/ folder, or their alpha channels. Disconnect "
                                   "masks, or clear the folder to train on the images input.")
            root = resolve_dataset_folder(folder)
            dataset = scan_folder(root)
            source, fingerprint = str(root), folder_fingerprint(root)
        elif images is not None:
            lines = [line for line in (captions or "").splitlines() if line.strip()]
            mask_images = comfy.masks_to_pil(masks) if masks is not None else None
            dataset = dataset_from_images(comfy.images_to_pil(images), lines, mask_images)
            digest = hashlib.sha256(images.cpu().numpy().tobytes())
            if masks is not None:
                digest.update(masks.cpu().numpy().tobytes())
            source, fingerprint = "graph images", digest.hexdigest()
        else:
            raise LoraLabError("Load Dataset needs a folder or an images input; set the folder to your dataset.")
        if lora_type not in (*LORA_TYPES, REGULARISATION):
            raise LoraLabError(f"lora_type {lora_type!r} is not one of {', '.join(LORA_TYPES)}, {REGULARISATION}; "
                               "pick one.")
        family = graph_model.family_of(model).name if model is not None else ""
        purpose = "regularisation" if lora_type == REGULARISATION else "training"
        if purpose == "regularisation":
            trigger = trigger_word.strip()
            report = examine_regularisation(dataset, trigger)
            text = f"Regularisation images ({len(dataset.items)}), for Train LoRA's reg_dataset.\n" + report.text()
        else:
            trigger = trigger_word.strip() or _single(dataset)
            report = examine(dataset, family or DEFAULT_FAMILY, lora_type, trigger)
            text = report.text() + ("" if family else "\n" + NO_MODEL_NOTE)
        value = DatasetValue(dataset, source, f"{fingerprint}|{trigger}", lora_type, family, report, trigger, purpose)
        shown = comfy.text_and_preview(text, flagged_sheet(dataset, report), cls)
        # What Train LoRA's plan line needs to say the steps before Queue (web/lora_lab.js keeps it).
        shown["lora_lab_dataset"] = [{"images": len(dataset.items), "lora_type": lora_type, "family": family,
                                      "trigger": trigger}]
        return io.NodeOutput(value, text, ui=shown)


def _single(dataset: Dataset) -> str:
    return dataset.trigger_words[0] if len(dataset.trigger_words) == 1 else ""
