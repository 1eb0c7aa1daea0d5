"""Training configuration: frozen, nested dataclasses whose fields carry their own help text and
allowed range, the guide's presets, and the guide's step rule.

Every field name is unique across sections, so the CLI, config files and the ComfyUI node can
all address a setting by its plain name (`rank`, `learning_rate`). An invalid value raises a
`LoraLabError` naming the field and what is allowed. The resolved config is saved in every LoRA
file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

from .adapters import ADAPTER_NAMES
from .errors import LoraLabError
from .families import FAMILY_NAMES
from .optimizers import OPTIMIZER_NAMES, check_optimizer_settings, optimizer_help

if TYPE_CHECKING:
    from .families.base import ModelFamily

AUTO = 0  # numeric settings where 0 means "work it out" (rank, learning rate, steps, alpha, resolution, ...)


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] | None = None, path: bool = False, item: type | None = None) -> Any:
    """A config field with its help text and the range or choices it accepts (for a list, of each
    item); `path` marks a local file or folder (only its name is shared in a LoRA's metadata);
    `item` is a list's item type where its default is empty."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "path": path,
            "item": item or (type(default[0]) if isinstance(default, tuple) and default else None)}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Validates every field of a section against its metadata when the section is built."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            meta = spec.metadata
            if meta["choices"] and value not in meta["choices"]:
                allowed = ", ".join(meta["choices"])
                raise LoraLabError(f"{spec.name} = {value!r} is not allowed; choose one of: {allowed}.")
            for item in value if isinstance(value, tuple) else (value,):
                numeric = isinstance(item, int | float) and not isinstance(item, bool)
                if numeric and not math.isfinite(item):
                    raise LoraLabError(f"{spec.name} = {item!r} must be a finite number.")
                low, high = meta["low"], meta["high"]
                if numeric and ((low is not None and item < low) or (high is not None and item > high)):
                    raise LoraLabError(f"{spec.name} = {item!r} is out of range; use a value from {low:g} to "
                                       f"{high:g}.")


@dataclass(frozen=True)
class ModelSettings(_Section):
    family: str = setting("auto", "Base model family: auto reads it from the model (folder index or the "
                          "checkpoint's tensor names).", choices=("auto", *FAMILY_NAMES))
    base_model: str = setting("", "Base model: a diffusers folder or a single-file .safetensors checkpoint. "
                              "Empty = the tiny embedded model (demo).", path=True)
    model_config: str = setting("", "Folder of diffusers config files used to read a single-file checkpoint "
                                "(empty = the ones shipped for the family; set it for unusual variants).", path=True)
    prediction_type: str = setting("auto", "What the base model predicts: auto reads it from the model; set "
                                   "v_prediction for v-models (SD 2.x-style finetunes). FLUX is always flow.",
                                   choices=("auto", "epsilon", "v_prediction"))


@dataclass(frozen=True)
class DataSettings(_Section):
    dataset: str = setting("", "Folder of images with same-name .txt captions; kohya 'N_name' subfolders repeat "
                           "their images N times. Empty = the embedded concept dataset (demo).", path=True)
    resolution: int = setting(AUTO, "Training resolution in pixels (0 = the model's own: 512 for SD 1.5, 1024 for "
                              "SDXL and FLUX).", low=0, high=4096)
    bucketing: bool = setting(True, "Aspect-ratio bucketing: train each image near its own aspect ratio instead of "
                              "centre-cropping it square.")
    trigger_word: str = setting("", "Trigger word; recorded in the LoRA's metadata and used in sample prompts. "
                                "Empty = taken from the dataset's repeat folder names (e.g. 10_xyz_style).")
    cache_dir: str = setting("", "Folder for cached latents and text conditioning, keyed by file content and "
                             "settings (empty = keep the cache in memory only).", path=True)
    cache: bool = setting(True, "Encode images and captions once before training (fast); off re-encodes every step.")
    caption_dropout: float = setting(0.0, "Share of training steps on which a caption is left empty, so the LoRA "
                                     "also applies without its words (0.05-0.1 for styles; 0 = off).", low=0, high=0.9)
    shuffle_tags: bool = setting(False, "Shuffle a caption's comma-separated tags each time it is used (tag "
                                 "captions, SD 1.5 and SDXL), keeping the first keep_tokens in place. Turns off "
                                 "caption caching.")
    keep_tokens: int = setting(1, "Tags at the start of a caption that shuffling leaves in place (1 keeps the "
                               "trigger word first).", low=0, high=32)
    validation_images: int = setting(AUTO, "Images held out of training to measure the validation loss, which shows "
                                     "overfitting (0 = auto: 10 % of them, 2-10, while at least 10 remain to train on; "
                                     "-1 = none).", low=-1, high=1000)
    reg_dataset: str = setting("", "Regularisation (prior-preservation) images: a folder of class images with "
                               "captions (e.g. photos captioned 'a photo of a woman' for a likeness LoRA), none with "
                               "the trigger word. Each step trains on a batch of them beside the training batch, so "
                               "the LoRA keeps drawing the class as the base model does. Empty = none.", path=True)
    prior_loss_weight: float = setting(1.0, "Weight of the regularisation images' loss beside the training images' "
                                       "(kohya's prior_loss_weight; 1 = equal).", low=0, high=10.0)
    masked_loss: bool = setting(False, "Masked loss: count the loss only where each image's mask says (a "
                                "name_mask.png beside it, masks/name.png, or the image's alpha channel; white or "
                                "opaque = counts). Images without a mask count everywhere.")
    mask_min_weight: float = setting(0.0, "Masked loss: the weight of the area outside the mask (0 = ignore it "
                                     "entirely, its pixels never reach the model; 0.1-0.3 keeps a little of the "
                                     "background).", low=0, high=1.0)
    flip_augment: bool = setting(False, "Mirror images left-right at random (twice the variety for symmetric "
                                 "subjects). It also mirrors what is not symmetric: text, logos, a side parting, "
                                 "a watch on one wrist. Leave it off for those.")
    color_jitter: float = setting(0.0, "Vary brightness, contrast and saturation at random by up to this share "
                                  "(0.05-0.1 is small; 0 = off). Not for LoRAs whose subject is a colour.",
                                  low=0, high=0.5)
    random_crop: bool = setting(False, "Zoom in by up to 20 % and crop at a random place within the bucket, "
                                "instead of centre-cropping (more variety in framing).")
    resolutions: tuple[int, ...] = setting((), "Multi-resolution training: train every image at each of these "
                                           "sizes (e.g. 512,768,1024), each bucketed at its size; resolution is then "
                                           "the samples' size (0 = the largest). Empty = resolution only.",
                                           low=32, high=4096, item=int)


@dataclass(frozen=True)
class LoraSettings(_Section):
    rank: int = setting(AUTO, "LoRA rank (0 = the preset's: 16 for style, 32 otherwise): 8-16 simple styles, 32 most "
                        "LoRAs, 64-128 complex subjects.", low=0, high=256)
    alpha: float = setting(0.0, "LoRA alpha; the LoRA's effect is scaled by alpha/rank (0 = same as rank).",
                           low=0, high=1024)
    targets: str = setting("attention", "Which denoiser layers get LoRA: attention (q/k/v/out projections), "
                           "attention_mlp (plus feed-forward), or a comma list of module name endings.")
    train_text_encoder: bool = setting(False, "Also train LoRA on the text encoder(s) (turns off caption caching).")
    adapter: str = setting("lora", "Adapter type: lora (plain LoRA, loads everywhere); loha (LyCORIS LoHa: a Hadamard "
                           "product of two low-rank pairs, more reach per parameter); lokr (LyCORIS LoKr: a Kronecker "
                           "product, very small files); dora (weight-decomposed LoRA: a LoRA plus a trained magnitude "
                           "per input channel, closer to full fine-tuning; linear layers only; needs pip install "
                           "lycoris-lora). ComfyUI's LoraLoader and A1111/Forge load all four.",
                           choices=ADAPTER_NAMES)
    lokr_factor: int = setting(-1, "LoKr only: the Kronecker factor, the size of its small matrix along each side "
                               "(-1 = as square as the layer allows, LyCORIS's default; 4-16 make larger, more "
                               "expressive files).", low=-1, high=64)
    init_lora: str = setting("", "Start from an existing LoRA, DoRA, LoHa or LoKr file (kohya, diffusers, LyCORIS, "
                             "ComfyUI's own training nodes or LoRA Lab) instead of from zero: its type, rank, alpha "
                             "and layers become the run's. Its weights go on training, but not its optimizer state, so "
                             "this is not an exact resume (resume is). Empty = start from zero.", path=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lokr_factor in (0, 1):
            raise LoraLabError(f"lokr_factor = {self.lokr_factor}: use -1 (automatic) or a factor of 2 or more.")
        if self.lokr_factor != -1 and self.adapter != "lokr":
            raise LoraLabError(f"lokr_factor = {self.lokr_factor} belongs to the lokr adapter; this run trains "
                               f"{self.adapter}. Set adapter = lokr, or leave lokr_factor at -1.")

    def adapter_options(self) -> dict[str, Any]:
        """The settings that belong to the adapter type only (handed to trainer/adapters/)."""
        return {"lokr_factor": self.lokr_factor} if self.adapter == "lokr" else {}


@dataclass(frozen=True)
class OptimizerSettings(_Section):
    optimizer: str = setting("adamw", optimizer_help(), choices=OPTIMIZER_NAMES)
    learning_rate: float = setting(0.0, "Learning rate (0 = the preset's: 5e-5 for likeness, 1e-4 otherwise): 1e-4 "
                                   "first attempt, 2e-4-3e-4 if not learning, 5e-5-1e-4 if overfitting, 1.0 with "
                                   "Prodigy.", low=0, high=10.0)
    text_encoder_lr: float = setting(0.0, "Text-encoder learning rate (0 = half the learning rate).", low=0, high=10.0)
    lr_scheduler: str = setting("constant", "Learning-rate schedule after warm-up.",
                                choices=("constant", "cosine", "linear"))
    warmup_steps: int = setting(0, "Steps over which the learning rate ramps up from 0.", low=0, high=100_000)
    weight_decay: float = setting(1e-2, "AdamW weight decay.", low=0, high=1.0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).", low=0, high=1000.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer_settings(self)


@dataclass(frozen=True)
class TrainSettings(_Section):
    preset: str = setting("none", "The guide's scenario: fills in rank, learning rate and the step range for the "
                          "settings left at 0; explicit values always win.",
                          choices=("none", "style", "character", "object", "likeness"))
    steps: int = setting(AUTO, "Training steps (0 = the guide's rule: 100 per image, within the preset's range).",
                         low=0, high=100_000)
    batch_size: int = setting(1, "Images per step.", low=1, high=64)
    gradient_accumulation: int = setting(1, "Batches accumulated per optimizer step.", low=1, high=128)
    gradient_checkpointing: bool = setting(False, "Trade ~35 % more time for less memory.")
    fp8_base: bool = setting(False, "Hold the frozen base model's linear layers in 8-bit float (half the memory of "
                             "bf16; the LoRA and all computation keep their precision). For FLUX on smaller GPUs.")
    mixed_precision: str = setting("auto", "Compute precision: auto = bf16 on a GPU that supports it, fp16 on "
                                   "other GPUs; on a CPU bf16 where the processor has bf16 units and it measures "
                                   "faster, else fp32. The LoRA and optimizer stay fp32.",
                                   choices=("auto", "no", "fp16", "bf16"))
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma (5 is common; 0 = off).", low=0, high=100.0)
    noise_offset: float = setting(0.0, "Noise offset (0.05-0.1 helps very dark/bright images; 0 = off).",
                                  low=0, high=1.0)
    check_memory: bool = setting(True, "Estimate peak memory before training and refuse a run that will not fit, "
                                 "saying which settings would (off = try anyway).")
    flow_shift: float = setting(0.0, "FLUX, Z-Image, FLUX.2: timestep shift of the flow objective (0 = the "
                                "model's own: FLUX.1-dev 3.16 at 1024 px and 1.9 at 512 px, Z-Image 3; 1 = no shift).",
                                low=0, high=100.0)
    train_guidance: float = setting(1.0, "FLUX.1-dev: the distilled guidance value the model sees while training "
                                    "(1.0, as kohya and ai-toolkit recommend; sample with 3-4).", low=0, high=30.0)
    seed: int = setting(42, "Random seed: the same seed and settings give the same LoRA.", low=0, high=2**31 - 1)
    validation_every: int = setting(AUTO, "Measure the validation loss every N steps (0 = about 20 times over the "
                                    "run); it is also measured at every checkpoint.", low=0, high=100_000)


@dataclass(frozen=True)
class OutputSettings(_Section):
    output_dir: str = setting("output/lora_lab", "Folder the run's folder is created in.", path=True)
    name: str = setting("my_lora", "Name of the LoRA; files are <name>.safetensors and <name>-step<N>.safetensors.")
    save_every: int = setting(AUTO, "Save a checkpoint every N steps (0 = four checkpoints over the run).",
                              low=0, high=100_000)
    overwrite: bool = setting(False, "Replace an existing run folder of the same name instead of refusing.")
    resume: str = setting("", "Continue a run where it stopped: 'latest' = the newest checkpoint of the run called "
                          "name, or the path of a checkpoint (.safetensors or its .resume file). Empty = new run.",
                          path=True)
    resume_with_changes: bool = setting(False, "Allow resuming with changed settings or dataset (recorded in the "
                                        "LoRA's metadata); off refuses and lists what changed.")


@dataclass(frozen=True)
class SampleSettings(_Section):
    prompts: tuple[str, ...] = setting(("{trigger}",), "Sample prompts (one a line, or separated by |); {trigger} "
                                       "is replaced by the trigger word.")
    strengths: tuple[float, ...] = setting((0.0, 0.4, 0.7, 1.0), "LoRA strengths for the sample grid "
                                           "(the guide: start at 0.7).")
    sample_steps: int = setting(20, "Sampler steps per sample image.", low=1, high=200)
    guidance_scale: float = setting(5.0, "Classifier-free guidance scale for samples.", low=0, high=30.0)
    sample_seed: int = setting(1, "Seed of every sample cell (the same for each, so cells compare).",
                               low=0, high=2**31 - 1)
    sample_every: int = setting(AUTO, "Sample the prompts at strength 1 while training, every N steps (0 = at every "
                                "checkpoint; -1 = never). Saved in the run folder and shown as the run goes.",
                                low=-1, high=100_000)


SECTIONS = {"model": ModelSettings, "data": DataSettings, "lora": LoraSettings, "optimizer": OptimizerSettings,
            "train": TrainSettings, "output": OutputSettings, "sample": SampleSettings}


@dataclass(frozen=True)
class TrainingConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)

    def value(self, name: str) -> Any:
        """A setting by its plain name."""
        return getattr(getattr(self, field_specs()[name][0]), name)

    @property
    def alpha(self) -> float:
        """The LoRA's alpha (0 means "same as rank"); meaningful once the rank is resolved."""
        return self.lora.alpha or float(self.lora.rank)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def shareable(self) -> dict[str, dict[str, Any]]:
        """`to_dict` with every local path cut to its last part (a folder or file name): what a LoRA
        shared with strangers may tell about the run, without the trainer's folders or user name."""
        nested = self.to_dict()
        for name, (section, spec) in field_specs().items():
            if spec.metadata["path"] and nested[section][name]:
                nested[section][name] = Path(nested[section][name]).name
        return nested


# The guide's scenarios: what a preset fills in for rank and learning rate left at 0. Ranks, learning
# rates and step ranges are the guide's own numbers; where it gives a range for rank or learning
# rate we take its conservative end ("start with rank 32", "first attempt: 0.0001").
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"rank": 32, "learning_rate": 1e-4},
    "style": {"rank": 16, "learning_rate": 1e-4},
    "character": {"rank": 32, "learning_rate": 1e-4},
    "object": {"rank": 32, "learning_rate": 1e-4},
    "likeness": {"rank": 32, "learning_rate": 5e-5},
}
# Step range per preset (the guide's scenarios; "none" follows its dataset-size table: 10 images
# 1000-1500 ... 100+ images 5000-8000, diminishing returns above ~8000).
STEP_RANGES = {"none": (1000, 8000), "style": (1500, 3000), "character": (2000, 4000),
               "object": (1000, 4000), "likeness": (3000, 5000)}
STEPS_PER_IMAGE = 100


def check_family_settings(config: TrainingConfig, family: ModelFamily) -> None:
    """Settings that mean nothing for this family, or without the setting they belong with, are
    refused rather than silently ignored (before Queue too: the panel's plan line says it)."""
    defaults = TrainingConfig()
    wrong = [name for name in family.unsupported_settings if config.value(name) != defaults.value(name)]
    if wrong:
        reset = ", ".join(f"{name} = {defaults.value(name)!r}" for name in wrong)
        raise LoraLabError(f"{', '.join(wrong)} do(es) not apply to {family.title} ({family.unsupported_reason}); "
                           f"reset to the default ({reset}).")
    if config.data.mask_min_weight and not config.data.masked_loss:
        raise LoraLabError(f"mask_min_weight = {config.data.mask_min_weight:g} applies only with masked loss; turn "
                           "masked_loss on, or set mask_min_weight to 0.")
    if config.optimizer.text_encoder_lr and not config.lora.train_text_encoder:
        raise LoraLabError(f"text_encoder_lr = {config.optimizer.text_encoder_lr:g} applies only while the text "
                           "encoder trains; turn train_text_encoder on, or set text_encoder_lr to 0.")


def auto_steps(preset: str, image_count: int) -> int:
    """The guide's rule: 100 steps per training image, kept inside the preset's range."""
    low, high = STEP_RANGES[preset]
    return max(low, min(high, STEPS_PER_IMAGE * image_count))


def field_specs() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every setting by its plain name: (section name, dataclass field)."""
    return {spec.name: (section, spec) for section, cls in SECTIONS.items() for spec in fields(cls)}


def _coerce(name: str, spec: dataclasses.Field, value: Any) -> Any:
    """Turn a value from a file, a flag or a widget into the field's type, or explain why not."""
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if isinstance(default, tuple):
            # Prompts may contain commas: they are separated by | (a flag) or by lines (a widget, a file).
            separator = "|" if name == "prompts" else ","
            items = ([s.strip() for line in value.splitlines() for s in line.split(separator)]
                     if isinstance(value, str) else value)
            item_type = spec.metadata["item"]
            return tuple(item_type(item) for item in items if item != "")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise LoraLabError(f"{name} = {value!r} is not a valid {type(default).__name__}.") from None


def build_config(settings: dict[str, Any] | None = None, base: TrainingConfig | None = None) -> TrainingConfig:
    """A config from plain-named settings over `base` (or the defaults). Nothing is filled in
    here: a value left at 0 ("the preset's") stays 0 until `with_preset_values`, so a preset can
    never overwrite a value someone set."""
    settings = dict(settings or {})
    specs = field_specs()
    unknown = sorted(set(settings) - set(specs))
    if unknown:
        raise LoraLabError(f"Unknown setting(s): {', '.join(unknown)}. "
                           "Run `python -m lora_lab train --help` for the list.")
    base = base or TrainingConfig()
    values = {section: dataclasses.asdict(getattr(base, section)) for section in SECTIONS}
    for name, value in settings.items():
        section, spec = specs[name]
        values[section][name] = _coerce(name, spec, value)
    return TrainingConfig(**{section: SECTIONS[section](**kw) for section, kw in values.items()})


def preset_values(config: TrainingConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the preset fills in: its values for the settings left at 0 (in `given`, else in `config`)."""
    given = given or {}
    return {name: value for name, value in PRESETS[config.train.preset].items()
            if not given.get(name, config.value(name))}


def with_preset_values(config: TrainingConfig) -> TrainingConfig:
    """The config with every setting left at 0 that the preset covers filled in from it."""
    return build_config(preset_values(config), base=config)


def config_from_dict(nested: dict[str, dict[str, Any]]) -> TrainingConfig:
    """Rebuild a config saved with `to_dict` (e.g. from a LoRA file's metadata)."""
    flat = {name: value for section in nested.values() for name, value in section.items()}
    return build_config(flat)


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Plain-named settings from a .toml or .json file; sections ([lora], [train], ...) are optional."""
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"Config file {path} does not exist; check the path.")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise LoraLabError(f"Config file {path} could not be read ({error}); it must be TOML or JSON.") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update(value)
        else:
            flat[key] = value
    return flat
