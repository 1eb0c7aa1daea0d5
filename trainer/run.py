"""One training job from start to finish: resolve the settings, load the base model and the
dataset, encode, add the LoRA, run the loop, write checkpoints and the loss log.

`train_lora` is the single entry point the CLI and the ComfyUI nodes call. Callers that already
hold a model or dataset (the nodes do) pass them in; otherwise they are loaded from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import embedded
from .augment import Augmentations
from .budget import check_disk, check_memory, planned_disk_bytes
from .captions import CaptionVariation
from .config import TrainingConfig, auto_steps, build_config, check_family_settings, preset_values
from .data import Dataset, MaskSettings, scan_folder, split_validation, validation_count
from .diagnosis import Diagnosis
from .doctor import augmentation_findings, regularisation_findings, repeated_prompts
from .errors import LoraLabError
from .eta import Schedule, batches, sample_passes
from .examples import TrainingSet
from .export import SAVE_DTYPES, lora_state_dict, named_layers, save_lora
from .families import detect_source_family, get_family
from .families.base import FamilyEncoders, LoadedModel
from .fp8 import quantize_linear_layers
from .history import RunJournal
from .init_lora import (
    NOT_EXACT,
    StartingAdapter,
    apply_starting_weights,
    read_starting_adapter,
    starting_record,
    starting_values,
)
from .loop import Checkpoint, TrainingCommands, TrainingEvents, run_loop
from .lora import add_lora
from .metadata import CheckpointStory, RunFacts, build_metadata, new_session_id
from .parallel import check_parallel_settings, processes
from .precision import resolve_precision
from .previews import PreviewSampler
from .resume import (
    SUFFIX,
    RunState,
    dataset_changes,
    dataset_listing,
    latest_state,
    read_state,
    settings_changes,
    state_path,
    write_state,
)
from .sampling import fill_trigger
from .validation import ValidationLoss
from .watch import RunWatch, diagnose_run, recommend
from .workflow import cli_prompt, graph_metadata

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    config: TrainingConfig  # with steps, alpha and resolution resolved
    run_dir: Path
    checkpoints: list[Checkpoint]
    losses: list[tuple[int, float, float]]
    stopped: bool
    trigger_words: tuple[str, ...]
    seconds: float  # the whole job, loading and encoding included
    loop_seconds: float  # the training loop alone
    model: LoadedModel | None  # still carrying the trained adapter, for sampling (None once released)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    samples: list[dict] = field(default_factory=list)  # {"step", "file"} of each sample sheet
    diagnosis: Diagnosis | None = None
    best: Checkpoint | None = None  # the checkpoint to use (see watch.recommend)
    step_mix: dict[int, float] = field(default_factory=dict)  # training size -> share of batches (multi-resolution)
    augment_cache: tuple[int, int] | None = None  # (drawn variants already encoded, encoded now), augmenting

    @property
    def final_path(self) -> Path:
        return self.checkpoints[-1].path

    @property
    def seconds_per_step(self) -> float:
        return self.loop_seconds / max(1, len(self.losses))


def default_device() -> torch.device:
    """This process's device: the one Accelerate assigned when several processes train together."""
    return processes().device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_model(config: TrainingConfig, device: torch.device | None = None) -> LoadedModel:
    device = device or default_device()
    source = Path(config.model.base_model or embedded.TINY_MODEL).expanduser()
    detected = detect_source_family(source) if config.model.family == "auto" or not config.model.base_model else ""
    if not config.model.base_model and config.model.family not in ("auto", detected):
        raise LoraLabError(f"The embedded demo model is {get_family(detected).title}; set base_model to a "
                           f"{get_family(config.model.family).title} model.")
    family = get_family(detected or config.model.family)
    # The frozen base is held in the compute dtype (bf16 on a GPU, or on a CPU with bf16 units); LoRA
    # weights always train in fp32.
    dtype = resolve_precision(config.train.mixed_precision, device)
    model = family.load(str(source), dtype, config.model.model_config)
    model.denoiser.to(device)
    model.encoders.place(device)
    if isinstance(model.encoders, FamilyEncoders):  # half-precision VAEs overflow on some images; it runs once
        model.encoders.vae.to(torch.float32)
    return model


def dataset_fingerprint(listing: list[list]) -> str:
    """Changes whenever an image, caption or repeat count changes (a digest of `dataset_listing`)."""
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def check_output_name(name: str) -> str:
    """A run name that is one plain folder name on every system, or a clear error."""
    if (not name or name.strip() != name or name.endswith(".") or name.startswith(("-", "."))
            or any(c in name for c in '/\\:*?"<>|') or any(ord(c) < 32 for c in name) or len(name) > 120
            or name.split(".")[0].lower() in WINDOWS_RESERVED):
        raise LoraLabError(f"Output name {name!r} is not a plain file name; use letters, digits, '-' and '_' "
                           "(at most 120 characters, not starting with '.' or '-').")
    return name


def trigger_word_of(config: TrainingConfig, dataset: Dataset) -> str:
    """The run's trigger word: the set one, else the dataset's when it has exactly one."""
    return config.data.trigger_word or (dataset.trigger_words[0] if len(dataset.trigger_words) == 1 else "")


def resolve_config(config: TrainingConfig, dataset: Dataset, model: LoadedModel, held: int | None = None,
                   start: StartingAdapter | None = None) -> TrainingConfig:
    """Every 'auto' value filled in, once, up front: the images held out (`held`), a starting file's
    type, rank, alpha and layers, the preset's rank and learning rate, steps, resolution, trigger
    word, alpha and checkpoint interval. The saved config says exactly what was done, and what
    runs after this reads one frozen config."""
    values: dict[str, Any] = {"family": model.family.name}
    if held is not None:
        values["validation_images"] = held or -1
    if start is not None:
        values.update(starting_values(config, start, model))
    values.update(preset_values(config, values))
    steps = config.train.steps or auto_steps(config.train.preset, len(dataset.items))
    rank = values.get("rank", config.lora.rank)
    sizes = config.data.resolutions
    values.update(steps=steps, resolution=config.data.resolution or (max(sizes) if sizes else model.resolution),
                  trigger_word=trigger_word_of(config, dataset), alpha=values.get("alpha", config.lora.alpha) or rank,
                  save_every=config.output.save_every or max(1, math.ceil(steps / 4)))
    return build_config(values, base=config)


def run_dir_of(config: TrainingConfig) -> Path:
    return Path(config.output.output_dir).expanduser() / check_output_name(config.output.name)


def prepare_run_dir(config: TrainingConfig, resuming: bool = False) -> Path:
    run_dir = run_dir_of(config)
    existing = sorted(run_dir.glob("*.safetensors")) if run_dir.is_dir() and not resuming else []
    if existing and not config.output.overwrite:
        raise LoraLabError(f"A run named {config.output.name!r} already exists in {run_dir} ({len(existing)} LoRA "
                           "files). Choose another name, set resume to 'latest' to continue it, or set overwrite "
                           "to replace it.")
    if existing:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in run_dir.glob(".*.tmp"):  # half-written files of a run that was killed while saving
        leftover.unlink(missing_ok=True)
    return run_dir


def resume_file(config: TrainingConfig) -> Path:
    """The resume file that `config.output.resume` names ('latest' or a checkpoint path)."""
    choice = config.output.resume.strip()
    if choice == "latest":
        return latest_state(run_dir_of(config))
    path = Path(choice).expanduser()
    if path.suffix.lower() == ".safetensors":
        return state_path(path)
    if path.suffix.lower() == SUFFIX:
        return path
    raise LoraLabError(f"resume = {choice!r}: use 'latest' or the path of a checkpoint (.safetensors or {SUFFIX}).")


def earlier_checkpoints(run_dir: Path, resume: RunState | None) -> list[Checkpoint]:
    """The checkpoints a resumed run saved before the one it resumes from (and that one), across any
    number of earlier resumes: those whose files are still there."""
    rows = resume.checkpoints if resume else []
    return [Checkpoint(row["step"], run_dir / row["file"], row["final"]) for row in rows
            if (run_dir / row["file"]).is_file()]


def check_resume(state: RunState, config: TrainingConfig, listing: list[list]) -> list[dict]:
    """Refuse a resume whose settings or dataset changed, unless allowed; returns the run's history
    of such changes (recorded in the metadata)."""
    changes = settings_changes(state.config, config.shareable()) + dataset_changes(state.dataset, listing)
    if state.step >= config.train.steps:
        raise LoraLabError(f"The checkpoint is at step {state.step} and the run has {config.train.steps} steps: "
                           "nothing left to train. To train further, raise steps and turn on resume_with_changes.")
    if not changes:
        return state.history
    if not config.output.resume_with_changes:
        raise LoraLabError(f"Cannot resume from step {state.step}: " + "; ".join(changes) + ". Put the settings "
                           "and dataset back as they were, or turn on resume_with_changes to continue with the "
                           "new ones.")
    log.warning("Resuming from step %d with changes: %s", state.step, "; ".join(changes))
    return [*state.history, {"step": state.step, "changes": changes}]


@dataclass
class Prepared:
    """What the loop trains on, and what watches it."""

    examples: TrainingSet
    validation: ValidationLoss | None
    sampler: PreviewSampler | None
    regularisation: TrainingSet | None = None


def training_sets(model: LoadedModel, dataset: Dataset, reg_dataset: Dataset | None,
                  config: TrainingConfig) -> tuple[TrainingSet, TrainingSet | None]:
    """The training images and the regularisation images, each at every training size, varied and
    augmented as the settings say (the regularisation set from a seed of its own), with their masks."""
    lora, train, data = config.lora, config.train, config.data
    sizes = data.resolutions or data.resolution
    masking = MaskSettings(data.mask_min_weight) if data.masked_loss else None

    def training_set(images: Dataset, seed: int) -> TrainingSet:
        return TrainingSet(model, images, sizes, data.bucketing, data.cache, data.cache_dir, lora.train_text_encoder,
                           CaptionVariation(data.caption_dropout, data.shuffle_tags, data.keep_tokens, seed),
                           Augmentations(data.flip_augment, data.color_jitter, data.random_crop, seed), masking)

    examples = training_set(dataset, train.seed)
    regularisation = training_set(reg_dataset, train.seed + 1) if reg_dataset and reg_dataset.items else None
    return examples, regularisation


def prepare_training(model: LoadedModel, dataset: Dataset, held_out: Dataset, config: TrainingConfig,
                     trigger_words: tuple[str, ...], start: StartingAdapter | None = None,
                     reg_dataset: Dataset | None = None) -> Prepared:
    """Encode the dataset (and the regularisation and held-out images and sample prompts), move what
    is no longer needed off the training device, shrink the base if asked, add the LoRA (from
    `start`'s weights when the run starts from a file), and check that the run fits."""
    lora, train, data, sample = config.lora, config.train, config.data, config.sample
    torch.manual_seed(train.seed)
    sizes = ", ".join(map(str, data.resolutions or (data.resolution,)))
    log.info("Encoding %d images at %s px (%d held out for validation%s)", len(dataset.items), sizes,
             len(held_out.items), f"; {len(reg_dataset.items)} regularisation images" if reg_dataset else "")
    if data.shuffle_tags and model.family.caption_style == "natural":
        log.warning("shuffle_tags shuffles comma-separated tags; %s captions are sentences, which it would jumble. "
                    "Turn it off for this model.", model.family.title)
    examples, regularisation = training_sets(model, dataset, reg_dataset, config)
    held = (TrainingSet(model, held_out, data.resolution, data.bucketing, data.cache, data.cache_dir,
                        lora.train_text_encoder) if held_out.items else None)
    compute_dtype = resolve_precision(train.mixed_precision, model.device)
    sampler = None
    if sample.sample_every >= 0:
        prompts = [fill_trigger(prompt, trigger_words) for prompt in sample.prompts]
        sampler = PreviewSampler(model, prompts, (data.resolution, data.resolution), sample.sample_steps,
                                 sample.guidance_scale, sample.sample_seed, compute_dtype,
                                 encode=examples.encode_prompts, text_trained=lora.train_text_encoder)
    in_loop = examples.encodes_in_loop or (regularisation is not None and regularisation.encodes_in_loop)
    if not in_loop and examples.cache_text:
        # Encoded once: the training device needs only the denoiser (and the VAE, to decode samples).
        model.encoders.place(torch.device("cpu"), keep_decoder=sampler is not None)
    if train.fp8_base:
        saved = quantize_linear_layers(model.denoiser, compute_dtype, model.family.fp8_kept)
        log.info("Base model linear layers held in 8-bit float (%.2f GiB saved)", saved / 2**30)
    add_lora(model, lora.rank, config.alpha, lora.targets, lora.train_text_encoder, lora.adapter,
             modules=start.modules if start else None, **lora.adapter_options(), **(start.hints if start else {}))
    if start is not None:
        apply_starting_weights(model, start)
    named_layers(model)  # every layer must have a name LoRA loaders map: refused now, not at the first save
    check_memory(model, examples, config, compute_dtype)
    validation = ValidationLoss(model, held, compute_dtype, train.batch_size, train.flow_shift) if held else None
    return Prepared(examples, validation, sampler, regularisation)


def save_start(run_dir: Path, name: str, model: LoadedModel, config: TrainingConfig, facts: RunFacts,
               events: RunJournal) -> Checkpoint:
    """A run from a file's first checkpoint, step 0: the file as this run holds it, in our layout,
    its tensors exactly as they were (fp32 holds any half-precision value exactly), so the sample
    grid compares the run's checkpoints with where it started."""
    events.on_phase("saving")
    path = run_dir / f"{name}-step{0:06d}.safetensors"
    save_lora(path, lora_state_dict(model, torch.float32), build_metadata(config, facts, 0))
    checkpoint = Checkpoint(0, path, False)
    events.on_checkpoint(checkpoint)
    return checkpoint


def stop_message(result: TrainingResult) -> str:
    """What a stopped run says: where it stopped, what was kept, and how to go on."""
    return (f"Stopped at step {result.checkpoints[-1].step} of {result.config.train.steps}; saved "
            f"{result.final_path.name}. To continue from there, set resume to 'latest' (run "
            f"{result.config.output.name}) and start it again.")


def finish_message(result: TrainingResult) -> str:
    """What a finished run says: the diagnosis and the checkpoint to use, and how its data was drawn
    (a multi-resolution run's step mix, the augmentation cache's hit rate)."""
    message = f"Finished: {result.config.train.steps} steps."
    if result.diagnosis is not None:
        message += f" {result.diagnosis}."
    if result.best is not None:
        message += f" Recommended checkpoint: {result.best.path.name} (step {result.best.step})."
    if len(result.step_mix) > 1:
        message += f" {describe_step_mix(result.step_mix)}."
    if result.augment_cache:
        message += f" {describe_augment_cache(*result.augment_cache)}."
    return message


def describe_step_mix(mix: dict[int, float]) -> str:
    return "Step mix: " + ", ".join(f"{size} px {share:.0%}" for size, share in sorted(mix.items()))


def describe_augment_cache(reused: int, encoded: int) -> str:
    drawn = reused + encoded
    return (f"Augmented images: {reused} of {drawn} draws reused an encoded variant ({reused / max(1, drawn):.0%} "
            f"cache hit rate), {encoded} newly encoded")


def check_regularisation(config: TrainingConfig, reg_dataset: Dataset | None) -> None:
    """prior_loss_weight belongs with regularisation images, and those must not show the concept."""
    if reg_dataset is None:
        if config.data.prior_loss_weight != 1.0:
            raise LoraLabError(f"prior_loss_weight = {config.data.prior_loss_weight:g} weighs regularisation images, "
                               "and this run has none; set reg_dataset (connect a second Load Dataset to Train "
                               "LoRA's reg_dataset), or set prior_loss_weight to 1.")
        return
    stop = [f for f in regularisation_findings(reg_dataset, config.data.trigger_word) if f.severity == "stop"]
    if stop:
        raise LoraLabError(stop[0].message)


def train_lora(config: TrainingConfig, events: TrainingEvents | None = None, model: LoadedModel | None = None,
               dataset: Dataset | None = None, owner: dict | None = None,
               graph: tuple[dict | None, dict | None] | None = None,
               commands: TrainingCommands | None = None, reg_dataset: Dataset | None = None) -> TrainingResult:
    """Train a LoRA as the config says and write its checkpoints; see the module docstring.
    `events` hear what the run does, `commands` stop or pause it (by default `events` itself, where
    it is both, as a progress display with a stop button is).
    `owner` (e.g. the ComfyUI node that started the run) is recorded in the run's journal; `graph`
    (the ComfyUI workflow and prompt that started it; by default one built from the config) in
    every file, so the file opens its training graph when dropped onto ComfyUI. `reg_dataset` holds
    the regularisation images (else they are read from the config's reg_dataset folder, if set)."""
    events = events or TrainingEvents()
    commands = commands or (events if isinstance(events, TrainingCommands) else TrainingCommands())
    started = time.time()
    given = config  # what was asked, before the settings left at 0 are filled in
    if dataset is None:
        dataset = scan_folder(config.data.dataset or embedded.CONCEPT_DATASET)
    if reg_dataset is None and config.data.reg_dataset:
        reg_dataset = scan_folder(config.data.reg_dataset)
    if model is None:
        model = load_base_model(config)
    held = validation_count(len(dataset.items), config.data.validation_images)
    train_set, held_out = split_validation(dataset, held)
    start = read_starting_adapter(Path(config.lora.init_lora), model) if config.lora.init_lora else None
    config = resolve_config(config, train_set, model, held, start)
    check_family_settings(config, model.family)
    check_regularisation(config, reg_dataset)
    listing = dataset_listing(dataset) + (dataset_listing(reg_dataset, "reg: ") if reg_dataset else [])
    resume, history = None, []
    if config.output.resume:
        source = resume_file(config)
        resume = read_state(source)
        history = check_resume(resume, config, listing)
        log.info("Resuming from %s at step %d of %d", source.name, resume.step, config.train.steps)
    check_parallel_settings(config.lora.train_text_encoder)
    run_dir = prepare_run_dir(config, resuming=resume is not None) if processes().main else run_dir_of(config)
    processes().wait()  # the others start once the run folder is ready
    journal = RunJournal(run_dir, config.output.name, config.train.steps, events, resume.losses if resume else [],
                         owner, resume.validation if resume else [], resume.samples if resume else [],
                         earlier_checkpoints(run_dir, resume),
                         tuple(w for w in [config.data.trigger_word] if w))
    try:
        graph_entries = graph_metadata(*graph) if graph else graph_metadata(None, cli_prompt(
            build_config({"trigger_word": config.data.trigger_word}, base=given), model.family))
        if start is not None:
            journal.started_from(f"Started from {start.describe()}: {NOT_EXACT}.")
        result = _train(config, journal, commands, model, train_set, held_out, run_dir, resume, history, listing,
                        started, graph_entries, start, reg_dataset)
    except LoraLabError as error:
        journal.finish("failed", str(error))
        raise
    except BaseException as error:  # the journal must not say "training" for a run that is gone
        journal.finish("failed", "Aborted." if isinstance(error, KeyboardInterrupt) else
                       f"Training stopped by an unexpected error ({type(error).__name__}: {error}); see the log.")
        raise
    journal.conclude(result.diagnosis, result.best)
    if result.stopped:
        journal.finish("stopped", stop_message(result))
    else:
        journal.finish("finished")
    return result


def _train(config: TrainingConfig, events: RunJournal, commands: TrainingCommands, model: LoadedModel,
           dataset: Dataset, held_out: Dataset, run_dir: Path, resume: RunState | None, history: list[dict],
           listing: list[list], started: float, graph_entries: dict[str, str],
           start: StartingAdapter | None = None, reg_dataset: Dataset | None = None) -> TrainingResult:
    train = config.train
    if config.model.prediction_type != "auto":
        model.prediction_type = config.model.prediction_type
    model.guidance = train.train_guidance
    trigger_words = tuple(w for w in [config.data.trigger_word] if w)
    prompts = tuple(fill_trigger(prompt, trigger_words) for prompt in config.sample.prompts)
    repeated = repeated_prompts(dataset.items + held_out.items, prompts)
    for finding in [repeated, *augmentation_findings(config.data)]:
        if finding is not None:
            log.warning(finding.message)
    prepared = prepare_training(model, dataset, held_out, config, trigger_words, start, reg_dataset)
    examples = prepared.examples
    step_mix = examples.step_mix(train.batch_size) if len(examples.sizes) > 1 else {}
    if step_mix:
        log.info(describe_step_mix(step_mix))
    check_disk(run_dir, planned_disk_bytes(model, config, resume.step + 1 if resume else 1))
    facts = RunFacts(family=model.family, base_model=model.identity.name, resolution=config.data.resolution,
                     steps=train.steps, image_count=len(dataset.items), trigger_words=trigger_words,
                     tag_frequency=dataset.tag_frequency(), dataset_fingerprint=dataset_fingerprint(listing),
                     prediction_type=model.prediction_type, started_at=started, session_id=new_session_id(),
                     resume_history=tuple(history), graph=graph_entries,
                     started_from=starting_record(start) if start else {})
    name = config.output.name
    watch = RunWatch(run_dir, name, train.steps, events, prepared.validation, train.validation_every,
                     prepared.sampler, config.sample.sample_every, resume.validation if resume else (),
                     resume.samples if resume else ())
    # What the run does between steps, so its time left counts saves, validation and samples.
    events.plan(Schedule(train.steps, config.output.save_every, watch.validation_every if prepared.validation else 0,
                         config.sample.sample_every if prepared.sampler else -1,
                         batches(len(held_out.items), train.batch_size),
                         sample_passes(len(config.sample.prompts), config.sample.sample_steps,
                                       model.family.uses_classifier_free_guidance(model), train.batch_size)
                         if prepared.sampler else 0))

    def save(step: int, final: bool, state: RunState) -> Path:
        """The LoRA file, then its resume file: a resume file never exists without its LoRA."""
        events.on_phase("saving")
        path = run_dir / (f"{name}.safetensors" if final else f"{name}-step{step:06d}.safetensors")
        tensors = lora_state_dict(model, SAVE_DTYPES["fp16"])
        story = CheckpointStory(diagnose_run(state.losses, watch.validation, train.steps), watch.validation_at(step),
                                watch.thumbnail_at(step))
        save_lora(path, tensors, build_metadata(config, facts, step, story))
        state.config, state.dataset, state.history = config.shareable(), listing, history
        state.validation, state.samples = watch.validation, watch.samples
        state.checkpoints.append({"step": step, "file": path.name, "final": final})
        write_state(state_path(path), state)
        log.debug("Saved %s", path.name)
        return path

    earlier = earlier_checkpoints(run_dir, resume)
    if start is not None and resume is None:
        earlier = [save_start(run_dir, name, model, config, facts, events)]
    loop = run_loop(model, examples, config, train.steps, config.output.save_every, save, events, commands,
                    resume=resume, watch=watch, earlier=earlier, regularisation=prepared.regularisation)
    diagnosis = diagnose_run(loop.losses, watch.validation, train.steps)
    augmenting = [s for s in (examples, prepared.regularisation) if s is not None and s.augment.active]
    augment_cache = ((sum(s.variant_hits for s in augmenting), sum(s.variant_misses for s in augmenting))
                     if augmenting else None)
    if augment_cache:
        log.info(describe_augment_cache(*augment_cache))
    return TrainingResult(config=config, run_dir=run_dir, checkpoints=loop.checkpoints, losses=loop.losses,
                          stopped=loop.stopped, trigger_words=trigger_words, seconds=time.time() - started,
                          loop_seconds=loop.seconds, model=model, validation=watch.validation,
                          samples=watch.samples, diagnosis=diagnosis,
                          best=recommend(loop.checkpoints, watch.validation, diagnosis), step_mix=step_mix,
                          augment_cache=augment_cache)
