"""The dataset doctor: the guide's image-quality checklist and caption rules, checked for the user
before a minute of training is spent. It reads the images and captions and never changes them.

Every finding names the images it is about, says why it matters and what to do. Severities:
"stop" (training cannot run: nothing usable), "warning" (training runs, but the guide expects a
worse LoRA), "note" (worth knowing). The thresholds below were chosen on labelled images generated
for the purpose (tests/test_doctor.py makes them): photo-like pictures (shapes over gradients with
texture at three scales) and the flat-colour pictures of the embedded demo, each sharp and with
the fault put in.

- Blur: the RMS Laplacian over the RMS gradient, on edge pixels only (gradient over 0.02), at 256 px
  on the short side. Sharp pictures measured 0.95-1.40, Gaussian blur of radius 2-5 px (at 512 px)
  0.14-0.62, four-times upscales 0.56-0.95: under 0.75 is blurry.
- Exposure: too dark when even the brightest 1 % of pixels is under 30 % luminance (sharp pictures:
  49-88 %, pictures dimmed to 30 %: at most 26 %; a subject on a black background keeps bright
  pixels); blown out when the mean luminance is over 85 %, or over 75 % with over a quarter of
  the pixels pure white (sharp pictures: mean 29-55 %, no pure white; brightened ones: 96-100 %).
- Near-duplicates: a 64-bit difference hash; at most 6 bits apart is the same picture (resized and
  recompressed or brightened copies measured 0-1 bits, different pictures 20-44).
- Variety (character and likeness sets, which the guide wants in varied poses, angles and
  settings): over half of all pairs within 12 bits is "most images look alike".
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .captions import is_sentence, is_tag_list, trigger_pattern
from .data import Dataset, ImageItem, load_image, read_mask
from .families import CLIP_TOKENIZER, DEFAULT_FAMILY, get_family

if TYPE_CHECKING:
    from .config import DataSettings

# The guide's "How Many Images Do You Need?" table: (minimum, recommended low, recommended high).
IMAGE_COUNTS = {"style": (10, 20, 50), "character": (15, 30, 100), "object": (10, 20, 40),
                "likeness": (20, 40, 100)}
LORA_TYPES = tuple(IMAGE_COUNTS)
MIN_RESOLUTION = 512  # the guide: "at least 512x512, 1024x1024 preferred"
MAX_ASPECT = 2.0  # buckets go up to 2:1; past that the picture is cropped
BLUR_THRESHOLD = 0.75
DARK_BRIGHTEST = 0.30
BLOWN_MEAN, BLOWN_WHITE_SHARE, BLOWN_MEAN_WITH_WHITE = 0.85, 0.25, 0.75
DUPLICATE_BITS = 6
ALIKE_BITS, ALIKE_SHARE = 12, 0.5
MEASURE_SIDE = 256
SEVERITIES = ("stop", "warning", "note")
# Images far below the wanted size get findings of their own, so a 40 px picture is not one of many
# "below 512 px": under an eighth of it (64 px) nothing can be learnt, under a quarter it is blocks.
UNUSABLE_SHARE, TINY_SHARE = 0.125, 0.25
# How bad a failed check is for the picture it names: the sheet of flagged images shows the worst first.
CHECK_WEIGHT = {"unreadable": 7, "unusable": 7, "exposure": 6, "tiny": 5, "blur": 4, "duplicates": 3, "aspect": 2,
                "resolution": 2, "captions": 2, "mask": 2, "trigger": 1, "style": 1, "variety": 0}
# A mask is empty when under 0.5 % of it counts (nothing would train), full when over 99.5 % does.
EMPTY_MASK, FULL_MASK = 0.005, 0.995
MASK_SOURCES = {"file": "mask files", "graph": "the graph's MASK", "alpha": "alpha channels"}
# Regularisation images: the class as the base draws it. Fewer than the training images means each is
# repeated more often than the training images are; a handful is too few to stand for a class.
MIN_REG_IMAGES = 10


@dataclass(frozen=True)
class Finding:
    check: str  # which check: "count", "resolution", "blur", "exposure", "duplicates", ...
    severity: str  # "stop", "warning" or "note"
    message: str  # what is wrong, why it matters, what to do
    images: tuple[str, ...] = ()  # the images it is about (names as the dataset lists them)


@dataclass
class DoctorReport:
    findings: list[Finding] = field(default_factory=list)
    image_count: int = 0

    @property
    def blocking(self) -> bool:
        """Whether a finding would stop training."""
        return any(f.severity == "stop" for f in self.findings)

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def flagged(self) -> dict[str, list[str]]:
        """Image name -> the checks it failed (warnings and stops)."""
        found: dict[str, list[str]] = {}
        for finding in self.findings:
            if finding.severity != "note":
                for name in finding.images:
                    found.setdefault(name, []).append(finding.check)
        return found

    def worst_first(self) -> list[str]:
        """The flagged images, the worst first: by their worst check, then by how many they failed."""
        flagged = self.flagged()
        return sorted(flagged, key=lambda name: (-max(CHECK_WEIGHT.get(c, 1) for c in flagged[name]),
                                                 -len(flagged[name])))

    def text(self) -> str:
        stops, warnings = (sum(f.severity == s for f in self.findings) for s in ("stop", "warning"))
        if stops:
            head = f"{stops} problem(s) stop training:"
        elif warnings:
            head = f"Ready to train, with {warnings} thing(s) to fix for a better LoRA:"
        else:
            head = "Ready to train."
        order = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        marks = {"stop": "✖", "warning": "!", "note": "·"}
        flagged = self.flagged()
        listing = [f"Flagged images ({len(flagged)}, worst first):",
                   *(f"  {name}: {', '.join(flagged[name])}" for name in self.worst_first())] if flagged else []
        return "\n".join([head, *(f"{marks[f.severity]} {f.message}" for f in order), *listing])


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def item_name(item: ImageItem) -> str:
    return f"{item.folder}/{item.path.name}" if item.folder else item.path.name


# --- measuring a picture -----------------------------------------------------------------------------

def luminance(image: Image.Image, side: int = MEASURE_SIDE) -> np.ndarray:
    """Gray levels in [0, 1], scaled down (never up) to `side` on the short side."""
    gray = image.convert("L")
    scale = min(1.0, side / min(gray.size))
    if scale < 1:
        gray = gray.resize((max(8, round(gray.width * scale)), max(8, round(gray.height * scale))),
                           Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0


def sharpness(gray: np.ndarray) -> float | None:
    """RMS Laplacian over RMS gradient on edge pixels (None for a picture without edges)."""
    laplacian = (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    gradient = np.hypot((gray[1:-1, 2:] - gray[1:-1, :-2]) / 2, (gray[2:, 1:-1] - gray[:-2, 1:-1]) / 2)
    edges = gradient > 0.02
    if edges.sum() < 20:
        return None
    return float(np.sqrt((laplacian[edges] ** 2).mean() / (gradient[edges] ** 2).mean()))


def difference_hash(image: Image.Image) -> int:
    """64 bits: whether each pixel of a 9x8 gray thumbnail is brighter than its right neighbour."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class Measurements:
    size: tuple[int, int]
    sharpness: float | None
    brightest: float  # 99th percentile luminance
    white_share: float  # pixels at pure white
    mean: float
    fingerprint: int


def measure(image: Image.Image) -> Measurements:
    gray = luminance(image)
    return Measurements(image.size, sharpness(gray), float(np.percentile(gray, 99)), float((gray >= 0.98).mean()),
                        float(gray.mean()), difference_hash(image))


# --- captions --------------------------------------------------------------------------------------

@cache
def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)


def common_word(trigger: str) -> bool:
    """Whether CLIP already has the trigger as one ordinary token: then it carries a meaning the
    model knows ("style", "toy", "sks") and the LoRA fights it. Made-up words spell out in pieces."""
    return len(_clip_tokenizer().tokenize(trigger)) == 1 and trigger.isalpha()


def _contains(caption: str, trigger: str) -> bool:
    return trigger_pattern(trigger).search(caption) is not None


# --- the examination --------------------------------------------------------------------------------

def examine(dataset: Dataset, family: str = DEFAULT_FAMILY, lora_type: str = "style", trigger: str = "",
            sample_prompts: tuple[str, ...] = ()) -> DoctorReport:
    """Check a dataset against the guide (see the module docstring); never changes a file."""
    report = DoctorReport(image_count=len(dataset.items))
    add = report.findings.append
    items = dataset.items
    if not items:
        add(Finding("count", "stop", "No usable images: add .jpg, .png or .webp files with .txt captions."))
        return report
    _count(report, lora_type)
    measured: dict[str, Measurements] = {}
    for item in items:
        try:
            measured[item_name(item)] = measure(item.image if item.image is not None else load_image(item.path))
        except Exception as error:  # noqa: BLE001 - the scan already skipped unreadable files; be safe
            add(Finding("unreadable", "warning", f"{item_name(item)} could not be read ({error}); replace it.",
                        (item_name(item),)))
    _pictures(report, measured, get_family(family).default_resolution)
    _duplicates_and_variety(report, measured, lora_type)
    _captions(report, items, family, trigger)
    _masks(report, items)
    skipped = [w for w in dataset.warnings if w.startswith("Skipped")]
    if skipped:
        add(Finding("skipped", "warning", f"{len(skipped)} file(s) skipped: " + " ".join(skipped[:3])))
    repeated = repeated_prompts(items, sample_prompts)
    if repeated is not None:
        add(repeated)
    return report


def examine_regularisation(dataset: Dataset, trigger: str = "", training_images: int = 0) -> DoctorReport:
    """Check a set of regularisation (class) images: the picture checks every set gets, their count
    (against the training set's, when known), and captions that describe the class without the
    trigger word."""
    report = DoctorReport(image_count=len(dataset.items))
    measured = {}
    for item in dataset.items:
        with contextlib.suppress(Exception):  # the scan already skipped unreadable files
            measured[item_name(item)] = measure(item.image if item.image is not None else load_image(item.path))
    _pictures(report, measured, MIN_RESOLUTION)
    _duplicates_and_variety(report, measured, "style")
    report.findings += regularisation_findings(dataset, trigger, training_images)
    _masks(report, dataset.items)
    return report


def regularisation_findings(dataset: Dataset, trigger: str, training_images: int = 0) -> list[Finding]:
    """The regularisation set's own rules: a "stop" for captions with the trigger word (they would
    teach the concept as the class), a warning for missing captions and for too few images."""
    findings, items, count = [], dataset.items, len(dataset.items)
    if count < MIN_REG_IMAGES or count < training_images:
        wanted = max(MIN_REG_IMAGES, training_images)
        findings.append(Finding("count", "warning", f"{count} regularisation images: use at least {wanted} (as many "
                                "as the training images or more, e.g. 100-200 of the class), so none is repeated "
                                "so often that the LoRA learns it."))
    else:
        findings.append(Finding("count", "note", f"{count} regularisation images: drawn one beside each training "
                                "image, each as often as the others."))
    missing = [item_name(i) for i in items if not i.caption.strip()]
    if missing:
        findings.append(Finding("captions", "warning", f"{len(missing)} regularisation image(s) without a caption "
                                f"({_names(missing)}): caption each with its class, e.g. 'a photo of a woman'.",
                                tuple(missing)))
    with_trigger = [item_name(i) for i in items if trigger and _contains(i.caption, trigger)]
    if with_trigger:
        findings.append(Finding("trigger", "stop", f"{len(with_trigger)} regularisation caption(s) contain the "
                                f"trigger word {trigger!r} ({_names(with_trigger)}): they must show the class "
                                "without your concept. Remove the trigger word from them.", tuple(with_trigger)))
    return findings


def augmentation_findings(data: DataSettings) -> list[Finding]:
    """What the augmentation settings risk, said before training."""
    findings = []
    if data.flip_augment:
        findings.append(Finding("augment", "warning", "flip_augment mirrors half the images: anything not "
                                "symmetric (text, logos, a side parting, a watch on one wrist) is learnt both ways "
                                "round. Turn it off if your subject has such a thing."))
    return findings


def _masks(report: DoctorReport, items: list[ImageItem]) -> None:
    """Masks that say nothing (empty: nothing trains; full: the same as no mask) or do not fit
    their image (another size: stretched to it)."""
    masked = [i for i in items if i.mask_source]
    if not masked:
        return
    add = report.findings.append
    sources = sorted({MASK_SOURCES[i.mask_source] for i in masked})
    add(Finding("mask", "note", f"{len(masked)} of {len(items)} images have masks (from {' and '.join(sources)}): "
                "with masked_loss on, only their white (opaque) parts train."))
    empty, full, resized = [], [], []
    for item in masked:
        try:
            mask = read_mask(item)
        except Exception as error:  # noqa: BLE001 - a broken mask file is a finding, not a crash
            add(Finding("mask", "warning", f"The mask of {item_name(item)} could not be read ({error}); replace "
                        "it.", (item_name(item),)))
            continue
        if mask.size != item.size:
            resized.append(item_name(item))
        share = float(np.asarray(mask, dtype=np.float32).mean()) / 255.0
        (empty if share < EMPTY_MASK else full if share > FULL_MASK else []).append(item_name(item))
    if empty:
        add(Finding("mask", "warning", f"{len(empty)} mask(s) are empty ({_names(empty)}): nothing of those images "
                    "would train. Paint the subject white.", tuple(empty)))
    if full:
        add(Finding("mask", "note", f"{len(full)} mask(s) are full ({_names(full)}): those images train "
                    "everywhere, as without a mask.", tuple(full)))
    if resized:
        add(Finding("mask", "warning", f"{len(resized)} mask(s) are of another size than their image "
                    f"({_names(resized)}): they are stretched to fit, which is only right if they match its "
                    "shape. Save each mask at its image's size.", tuple(resized)))


def repeated_prompts(items: list[ImageItem], prompts: tuple[str, ...]) -> Finding | None:
    """Sample prompts that repeat a training caption word for word (they only show what was
    memorised), as a finding; None when there are none."""
    captions = {" ".join(item.caption.lower().split()) for item in items}
    repeated = [p for p in prompts if " ".join(p.lower().split()) in captions]
    if not repeated:
        return None
    return Finding("prompts", "warning", f"Sample prompt(s) {_names(repeated)} repeat a training caption word for "
                   "word: test with prompts different from the captions (the guide), or the samples only show what "
                   "was memorised.")


def _count(report: DoctorReport, lora_type: str) -> None:
    minimum, low, high = IMAGE_COUNTS[lora_type]
    count = report.image_count
    if count < minimum:
        report.findings.append(Finding("count", "warning", f"{count} images: a {lora_type} LoRA needs at least "
                                       f"{minimum} ({low}-{high} recommended). Add more, varied images."))
    elif count < low:
        report.findings.append(Finding("count", "note", f"{count} images: enough to start; {low}-{high} are "
                                       f"recommended for a {lora_type} LoRA."))
    else:
        report.findings.append(Finding("count", "note", f"{count} images: within or above the {low}-{high} "
                                       f"recommended for a {lora_type} LoRA."))


def _pictures(report: DoctorReport, measured: dict[str, Measurements], training_size: int) -> None:
    add = report.findings.append
    wanted = min(MIN_RESOLUTION, training_size)
    sized = sorted(measured.items(), key=lambda item: min(item[1].size))  # the smallest first
    unusable_below, tiny_below = round(UNUSABLE_SHARE * wanted), round(TINY_SHARE * wanted)
    for check, low, high, what in (
            ("unusable", 0, unusable_below, "too small to learn from"),
            ("tiny", unusable_below, tiny_below, "far too small")):
        names = [n for n, m in sized if low <= min(m.size) < high]
        if names:
            shown = [f"{n} ({min(measured[n].size)} px)" for n in names]
            add(Finding(check, "warning", f"{len(names)} image(s) {what}, under {high} px on the short side "
                        f"({_names(shown)}): blown up over {wanted // high}x, they teach blur and blocks. Replace "
                        f"them with larger versions or remove them ({training_size} is this model's size).",
                        tuple(names)))
    small = [n for n, m in sized if tiny_below <= min(m.size) < wanted]
    if small:
        add(Finding("resolution", "warning", f"{len(small)} image(s) below {wanted} px on the short side "
                    f"({_names(small)}): they are upscaled in training and look soft. Use {wanted} px or more "
                    f"({training_size} is this model's size).", tuple(small)))
    below_native = [n for n, m in measured.items() if wanted <= min(m.size) < training_size]
    if below_native:
        add(Finding("resolution", "note", f"{len(below_native)} image(s) below this model's {training_size} px "
                    f"({_names(below_native)}); the guide prefers {training_size}.", tuple(below_native)))
    wide = [n for n, m in measured.items() if max(m.size) / min(m.size) > MAX_ASPECT]
    if wide:
        add(Finding("aspect", "warning", f"{len(wide)} image(s) longer than {MAX_ASPECT:g}:1 ({_names(wide)}): "
                    "training crops them to 2:1 and loses the ends. Crop them yourself to what matters.",
                    tuple(wide)))
    blurry = [n for n, m in measured.items() if m.sharpness is not None and m.sharpness < BLUR_THRESHOLD]
    if blurry:
        add(Finding("blur", "warning", f"{len(blurry)} image(s) look blurry ({_names(blurry)}): the LoRA learns "
                    "the blur. Replace them with sharp ones or remove them.", tuple(blurry)))
    dark = [n for n, m in measured.items() if m.brightest < DARK_BRIGHTEST]
    if dark:
        add(Finding("exposure", "warning", f"{len(dark)} image(s) too dark ({_names(dark)}): details are lost. "
                    "Brighten them or use well-lit ones.", tuple(dark)))
    blown = [n for n, m in measured.items()
             if m.mean > BLOWN_MEAN or (m.white_share > BLOWN_WHITE_SHARE and m.mean > BLOWN_MEAN_WITH_WHITE)]
    if blown:
        add(Finding("exposure", "warning", f"{len(blown)} image(s) blown out ({_names(blown)}): large areas are "
                    "pure white. Use better-exposed ones (a plain studio background is fine: ignore this then).",
                    tuple(blown)))


def _duplicates_and_variety(report: DoctorReport, measured: dict[str, Measurements], lora_type: str) -> None:
    names = list(measured)
    groups: list[list[str]] = []
    for a, b in itertools.combinations(names, 2):
        if hamming(measured[a].fingerprint, measured[b].fingerprint) <= DUPLICATE_BITS:
            group = next((g for g in groups if a in g or b in g), None)
            if group is None:
                groups.append([a, b])
            else:
                group.extend(n for n in (a, b) if n not in group)
    for group in groups:
        report.findings.append(Finding("duplicates", "warning", f"{len(group)} images are near-duplicates "
                                       f"({_names(group)}): they count that picture {len(group)} times over. Keep "
                                       "one, or vary them.", tuple(group)))
    if lora_type in ("character", "likeness") and len(names) >= 4:
        pairs = list(itertools.combinations(names, 2))
        alike = sum(hamming(measured[a].fingerprint, measured[b].fingerprint) <= ALIKE_BITS for a, b in pairs)
        if alike / len(pairs) > ALIKE_SHARE:
            report.findings.append(Finding("variety", "warning", f"Most images look alike ({alike} of {len(pairs)} "
                                           "pairs near-identical in framing): the guide asks for varied poses, "
                                           "angles, expressions and settings, or the LoRA learns one picture.",
                                           tuple(names)))


def _captions(report: DoctorReport, items: list[ImageItem], family: str, trigger: str) -> None:
    add = report.findings.append
    style = get_family(family).caption_style
    missing = [item_name(i) for i in items if not i.captioned]
    if missing:
        add(Finding("captions", "warning", f"{len(missing)} image(s) without a caption file ({_names(missing)}): "
                    "write a .txt beside each, or let the Caption node fill them in.", tuple(missing)))
    empty = [item_name(i) for i in items if i.captioned and not i.caption.strip()]
    if empty:
        add(Finding("captions", "warning", f"{len(empty)} empty caption(s) ({_names(empty)}): describe what is in "
                    "the picture.", tuple(empty)))
    if not trigger:
        add(Finding("trigger", "warning", "No trigger word: set a made-up one (e.g. xyz_style) so the LoRA can be "
                    "switched on in prompts."))
        return
    if common_word(trigger):
        add(Finding("trigger", "warning", f"The trigger word {trigger!r} is an ordinary word the model already "
                    "knows: choose a made-up one like xyz_style or sks_person (the guide: unique trigger words)."))
    captioned = [i for i in items if i.caption.strip()]
    only = [item_name(i) for i in captioned if i.caption.strip(" ,.").lower() == trigger.lower()]
    if only:
        add(Finding("captions", "warning", f"{len(only)} caption(s) are only the trigger word ({_names(only)}): "
                    "describe what varies (pose, setting, lighting, clothes), so the trigger learns only what "
                    "stays the same.", tuple(only)))
    lacking = [item_name(i) for i in captioned if not _contains(i.caption, trigger)]
    if lacking:
        add(Finding("trigger", "warning", f"{len(lacking)} caption(s) lack the trigger word {trigger!r} "
                    f"({_names(lacking)}): the Caption node adds it.", tuple(lacking)))
    if style == "tags":
        late = [item_name(i) for i in captioned if _contains(i.caption, trigger)
                and not i.caption.lower().lstrip().startswith(trigger.lower())]
        if late:
            add(Finding("trigger", "note", f"{len(late)} caption(s) do not start with the trigger word "
                        f"({_names(late)}); tag captions usually do.", tuple(late)))
    title = get_family(family).title
    if style == "natural":
        tagged = [item_name(i) for i in captioned if is_tag_list(i.caption)]
        if tagged:
            add(Finding("style", "note", f"{len(tagged)} caption(s) are tag lists ({_names(tagged)}); {title} "
                        "learns best from natural sentences (the guide). The Caption node can rewrite them.",
                        tuple(tagged)))
    elif style == "tags":
        prose = [item_name(i) for i in captioned if is_sentence(i.caption)]
        if prose:
            add(Finding("style", "note", f"{len(prose)} caption(s) are long sentences ({_names(prose)}); {title} "
                        "learns best from comma-separated tags (the guide). The Caption node can rewrite them.",
                        tuple(prose)))


# --- the contact sheet of flagged images -----------------------------------------------------------------

def flagged_sheet(dataset: Dataset, report: DoctorReport, columns: int = 4, side: int = 160,
                  limit: int = 8) -> Image.Image | None:
    """Thumbnails of the worst `limit` flagged images (the last cell says how many more there are),
    each labelled with its name and what it failed. Two rows at most, so that on a node the labels
    stay large enough to read; the text report lists every flagged image."""
    from .sampling import wrap_text

    flagged = report.flagged()
    by_name = {item_name(i): i for i in dataset.items}
    worst = [name for name in report.worst_first() if name in by_name]
    chosen = [by_name[name] for name in worst[:limit - 1 if len(worst) > limit else limit]]
    more = len(worst) - len(chosen)
    if not chosen:
        return None
    font = ImageFont.load_default(size=13)
    label_lines, line = 3, 16
    cell_height = side + label_lines * line + 8
    cells = len(chosen) + bool(more)
    rows = (cells + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    if more:  # the last cell says how many are not shown
        x, y = len(chosen) % columns * side, len(chosen) // columns * cell_height
        big = ImageFont.load_default(size=28)
        draw.text((x + side // 2, y + side // 2), f"+{more} more", fill="black", font=big, anchor="mm")
        for number, part in enumerate(wrap_text("all of them are listed in the report", font, side - 8)[:2]):
            draw.text((x + 4, y + side + number * line), part, fill="black", font=font)
    for index, item in enumerate(chosen):
        x, y = index % columns * side, index // columns * cell_height
        picture = item.image if item.image is not None else load_image(item.path)
        picture.thumbnail((side - 8, side - 8))
        sheet.paste(picture, (x + (side - picture.width) // 2, y + 4 + (side - 8 - picture.height) // 2))
        text = f"{item.path.name}: {', '.join(flagged[item_name(item)])}"
        for number, part in enumerate(wrap_text(text, font, side - 8)[:label_lines]):
            draw.text((x + 4, y + side + number * line), part, fill="black", font=font)
    return sheet
