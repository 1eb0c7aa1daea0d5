"""Caption: every caption gets the trigger word (first, in a tag list), in the style the model's
family learns best from; your edits are applied; missing captions come from an automatic
captioner (a model under models/captioners) or a template. With write_txt_files on, the captions
are saved as .txt sidecars, each previous text kept as .txt.bak.

Where it may write: only inside ComfyUI's input folder, or inside a folder the owner of this
machine has listed in the LORA_LAB_WRITABLE_FOLDERS environment variable (separated like PATH).
A workflow is a file strangers share, so its folder widget must not be able to choose where files
are written; an environment variable is set by whoever runs the server, never by a workflow.
Symbolic links that lead out of those folders are refused.
"""

from __future__ import annotations

from pathlib import Path

from ..trainer.captioners import HOW_TO_GET_ONE, find_captioners, loaded_captioner
from ..trainer.captions import recaption
from ..trainer.doctor import item_name
from ..trainer.errors import LoraLabError
from ..trainer.families import DEFAULT_FAMILY, get_family
from ..trainer.files import atomic_write_text
from . import comfy_bridge as comfy
from . import graph_model, widget_history
from .comfy_bridge import DATASET, io
from .folders import WRITABLE_FOLDERS_VARIABLE, writable_roots
from .values import DatasetValue

NO_CAPTIONER = "none"


def sidecar_path(image: Path, roots: list[Path]) -> Path:
    """The .txt beside an image, if writing it stays inside one of `roots`; else a clear refusal."""
    target = image.with_suffix(".txt")
    resolved = target.parent.resolve() / target.name
    if target.is_symlink() or not any(resolved.is_relative_to(root) for root in roots):
        raise LoraLabError(
            f"Caption will not write {target}: it may only write inside ComfyUI's input folder "
            f"({roots[0]}) or a folder listed in the {WRITABLE_FOLDERS_VARIABLE} environment variable, and never "
            "through a symbolic link. Move the dataset into the input folder, or add its folder to "
            f"{WRITABLE_FOLDERS_VARIABLE} before starting ComfyUI, or turn write_txt_files off.")
    return target


def parse_edits(text: str) -> dict[str, str]:
    """'name: caption' lines (the format of this node's captions output) as name -> caption."""
    edits = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, separator, caption = line.partition(":")
        if not separator or not name.strip():
            raise LoraLabError(f"edits line {number} ({line.strip()[:40]!r}) is not 'image name: caption'; copy "
                               "lines from the captions output and change the text after the colon.")
        edits[name.strip()] = caption.strip()
    return edits


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraLabCaption", display_name="Caption", category="LoRA Lab",
            description="Trigger word in every caption, the model's caption style, your edits, automatic captions "
                        "for images without one; optionally saved as .txt files.",
            inputs=[
                DATASET.Input("dataset", tooltip="From Load Dataset."),
                io.Model.Input("model", optional=True, tooltip="Your base model (optional): captions take its "
                               "family's style (tags for SD 1.5, mixed for SDXL, sentences for FLUX). Without it, the "
                               "family Load Dataset saw, else SD 1.5."),
                io.String.Input("trigger_word", default="", tooltip="Leave empty to use the trigger word set on "
                                "Load Dataset (or the dataset's N_name folder name); a word here overrides it."),
                io.String.Input("template", default="{trigger}", tooltip="Caption for images without one "
                                "when no captioner is chosen; {trigger}, {name} (file name) and {folder} are filled "
                                "in. Describe what varies between images: a caption of only the trigger word "
                                "teaches everything in the picture to it."),
                # Added after the first release: optional, so API prompts written before them still
                # validate; write_txt_files is optional too, so the widgets keep their order.
                io.Combo.Input("captioner", options=[NO_CAPTIONER, *find_captioners(comfy.captioner_root())],
                               default=NO_CAPTIONER, optional=True,
                               tooltip=f"Write missing captions automatically with a model in models/captioners/ "
                               f"({HOW_TO_GET_ONE}); loaded for this node only, then freed. 'none' uses the template."),
                io.Boolean.Input("replace_existing", default=False, optional=True,
                                 tooltip="Let the captioner rewrite every caption, not only the missing ones."),
                io.String.Input("edits", multiline=True, default="", optional=True,
                                tooltip="Your changes, one 'image name: caption' a line (copy lines from the captions "
                                "output and edit them)."),
                io.Boolean.Input("write_txt_files", default=False, optional=True,
                                 tooltip="Also save the captions as .txt files next to the images (the old text is "
                                 f"kept as .txt.bak). Only inside ComfyUI's input folder or a folder in "
                                 f"{WRITABLE_FOLDERS_VARIABLE}."),
            ],
            outputs=[DATASET.Output(display_name="dataset"), io.String.Output(display_name="captions")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, dataset: DatasetValue, trigger_word: str, template: str, captioner: str = NO_CAPTIONER,
                replace_existing: bool = False, edits: str = "", write_txt_files: bool = False,
                model=None) -> io.NodeOutput:
        widget_history.note_removed_inputs("LoraLabCaption", cls.hidden.prompt, cls.hidden.unique_id)
        trigger = trigger_word.strip() or dataset.trigger_word or (
            dataset.dataset.trigger_words[0] if dataset.dataset.trigger_words else "")
        if not trigger:
            raise LoraLabError("Caption needs a trigger word: set it on Load Dataset (or here), e.g. xyz_style.")
        family = graph_model.family_of(model).name if model is not None else dataset.family or DEFAULT_FAMILY
        changes = parse_edits(edits)
        names = {item_name(item) for item in dataset.dataset.items} | {i.path.name for i in dataset.dataset.items}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise LoraLabError(f"edits name images that are not in the dataset: {', '.join(unknown[:5])}. Use the "
                               "names from the captions output.")
        if write_txt_files:  # refuse before anything is written, not halfway through
            if any(item.image is not None for item in dataset.dataset.items):
                raise LoraLabError("write_txt_files needs a dataset loaded from a folder, not graph images.")
            roots = writable_roots()
            targets = [sidecar_path(item.path, roots) for item in dataset.dataset.items]
        try:
            if captioner == NO_CAPTIONER:
                captioned = recaption(dataset.dataset, trigger, family, template, edits=changes)
            else:
                with loaded_captioner(comfy.captioner_root() / captioner, comfy.compute_device()) as model_caption:
                    captioned = recaption(dataset.dataset, trigger, family, template, model_caption, changes,
                                          replace_existing)
        except (KeyError, IndexError, ValueError) as error:
            raise LoraLabError(f"template {template!r} has an unknown placeholder ({error}); use {{trigger}}, "
                               "{name} or {folder}.") from None
        if write_txt_files:
            for item, target in zip(captioned.items, targets, strict=True):
                write_sidecar(target, item.caption)
        text = "\n".join(f"{item_name(item)}: {item.caption}" for item in captioned.items)
        connected = model is not None or dataset.family
        note = f"({get_family(family).title} caption style{'' if connected else ': no MODEL connected'})"
        only_trigger = sum(item.caption.strip(" ,.") == trigger for item in captioned.items)
        if only_trigger:
            note += (f"\n! {only_trigger} caption(s) are only the trigger word: describe what varies (edit them in "
                     "edits, or choose a captioner), or the trigger learns everything in those pictures.")
        value = DatasetValue(captioned, dataset.source, "|".join((dataset.fingerprint, trigger, family, text)),
                             dataset.lora_type, dataset.family or family, dataset.report, trigger)
        return io.NodeOutput(value, text, ui={"text": (f"{note}\n{text}",)})


def write_sidecar(target: Path, caption: str) -> None:
    """Write a caption file, keeping the previous text (if any, and if different) as .txt.bak."""
    new = caption + "\n"
    if target.is_file():
        old = target.read_text(encoding="utf-8", errors="replace")
        if old == new:
            return
        atomic_write_text(target.with_suffix(".txt.bak"), old)
    atomic_write_text(target, new)
