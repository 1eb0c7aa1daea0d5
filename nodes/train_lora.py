"""Train LoRA: trains on the graph's own MODEL, CLIP and VAE and hands the result straight on
(MODEL and CLIP with the LoRA applied), with progress, live loss and a Cancel that saves. With
`background` on, the run is a job of the server (nodes/jobs.py) and the node returns at once:
its outputs carry the checkpoints saved so far, and queueing again after a new one lands brings it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..trainer.charts import loss_chart
from ..trainer.config import TrainingConfig, build_config
from ..trainer.errors import LoraLabError
from ..trainer.families.base import ModelIdentity
from ..trainer.history import journal_path, loss_log_path, read_journal, read_loss_log
from ..trainer.init_lora import has_text_encoder_layers
from ..trainer.resume import SUFFIX
from ..trainer.run import (
    TrainingResult,
    check_output_name,
    finish_message,
    stop_message,
    train_lora,
    trigger_word_of,
)
from . import comfy_bridge as comfy
from . import graph_model, jobs, widget_history
from .comfy_bridge import DATASET, RUN, io
from .panel_events import PanelEvents
from .run_plan import LATEST, NEW_RUN, RunIdentity, RunPlan, default_plan, plan_run
from .settings_widgets import setting_widget
from .values import DatasetValue, TrainingRun

# Widgets in this order are public API: workflow files store widget values by position.
# What the guide calls the essential settings stays in view; the rest is folded until asked for.
ESSENTIAL = ("preset", "steps", "rank", "learning_rate", "resolution", "name", "resume", "prompts", "background")
SETTINGS = ("preset", "steps", "rank", "alpha", "learning_rate", "resolution", "batch_size", "optimizer",
            "lr_scheduler", "warmup_steps", "save_every", "seed", "name", "gradient_checkpointing",
            "mixed_precision", "min_snr_gamma", "noise_offset", "bucketing", "resume", "resume_with_changes",
            "sample_every", "prompts", "validation_images")
SETTINGS_AFTER_BACKGROUND = ("adapter", "lokr_factor", "init_lora", "train_text_encoder", "text_encoder_lr",
                             "prior_loss_weight", "masked_loss", "mask_min_weight", "flip_augment", "color_jitter",
                             "random_crop", "resolutions")  # added after `background`, so they follow it
NO_FILE = "None"  # init_lora: start from zero
# Where a widget differs from the trainer's setting. The seed gets no "control after generate":
# a seed that changed after every Queue would train the LoRA again each time.
# The preset follows the LoRA type chosen once on Load Dataset unless set here.
FROM_DATASET = "from dataset"
WIDGET_OPTIONS = {"alpha": {"step": 1.0}, "learning_rate": {"step": 1e-5, "round": 1e-7},
                  "text_encoder_lr": {"step": 1e-5, "round": 1e-7},
                  "train_text_encoder": {"tooltip": "Also train LoRA on the text encoder (SD 1.5: CLIP-L; SDXL: "
                                                    "CLIP-L and CLIP-G), as kohya's train_text_encoder does: the "
                                                    "LoRA's clip half, which LoraLoader's strength_clip scales. "
                                                    "Captions are then encoded at every step (not cached). FLUX "
                                                    "trains its transformer only."},
                  "seed": {"control_after_generate": False}, "name": {"default": "my_lora"},
                  "prior_loss_weight": {"tooltip": "Weight of the regularisation images' loss (connect a second Load "
                                                   "Dataset, lora_type regularisation, to reg_dataset); 1 = as "
                                                   "much as the training images'. kohya's prior_loss_weight."},
                  "color_jitter": {"step": 0.01}, "mask_min_weight": {"step": 0.05},
                  "resolutions": {"multiline": False, "tooltip": "Multi-resolution training: sizes separated by "
                                  "commas (e.g. 512,768,1024); every image trains at each, bucketed at its size. "
                                  "resolution is then the samples' size (0 = the largest). Empty = resolution only."},
                  "preset": {"default": FROM_DATASET, "extra_choices": (FROM_DATASET,),
                             "tooltip": "The guide's scenario: fills in rank, learning rate and the step range for "
                                        "settings left at 0. 'from dataset' = the LoRA type chosen on Load Dataset."}}

BACKGROUND_TOOLTIP = ("Train as a job of the server and return at once, so the queue goes on: sample and stack the "
                      "checkpoints while the run trains (queue again to pick up new ones). Prompts and the job take "
                      "turns on the GPU. Stop it with the panel's Stop button (it saves, as Cancel does).")

log = logging.getLogger(__name__)
NODE_ID = "LoraLabTrainLora"
# Added since the first release: optional, so API prompts written before them still validate.
LATER_INPUTS = frozenset(widget_history.history()[NODE_ID]["added"])


def resume_choices(output_dir: Path) -> list[str]:
    """The resume widget's options: a new run, the latest checkpoint of the named run, or any
    checkpoint that has a resume file (as '<run>/<file>')."""
    found = sorted(output_dir.glob(f"*/*{SUFFIX}")) if output_dir.is_dir() else []
    return [NEW_RUN, LATEST, *(f"{path.parent.name}/{path.name}" for path in found)]


def settings_input(name: str) -> io.Input:
    """The widget of one trainer setting, folded away unless the guide calls it essential."""
    widget = (resume_widget() if name == "resume" else init_lora_widget() if name == "init_lora" else
              setting_widget(name, optional=name in LATER_INPUTS, **WIDGET_OPTIONS.get(name, {})))
    return widget if name in ESSENTIAL else comfy.folded(widget)


def node_settings(values: dict, lora_type: str = "none") -> dict:
    """The trainer settings of the node's widgets (those it knows), the preset "from dataset" being
    the dataset's LoRA type (Load Dataset); `background` is how the node runs, not a setting."""
    settings = {k: v for k, v in values.items() if k in (*SETTINGS, *SETTINGS_AFTER_BACKGROUND) and k != "resume"}
    if settings.get("preset", FROM_DATASET) == FROM_DATASET:
        settings["preset"] = lora_type
    return settings


def node_config(values: dict, output_dir: Path, lora_type: str = "none", plan: RunPlan | None = None) -> TrainingConfig:
    """The trainer config of the node's widgets; `plan` says which run folder and checkpoint
    (nodes/run_plan.py; without one, as if no run were on disk)."""
    plan = plan or default_plan(output_dir, requested_name(values), str(values.get("resume", NEW_RUN)))
    extra = {k: v for k, v in values.items()  # e.g. family
             if k not in (*SETTINGS, *SETTINGS_AFTER_BACKGROUND) and k != "background"}
    start = init_lora_path(values.get("init_lora", NO_FILE))
    return build_config({**node_settings(values, lora_type), **extra, "output_dir": str(output_dir),
                         "name": plan.name, "resume": plan.resume, "init_lora": str(start or "")})


def init_lora_path(name: str) -> Path | None:
    """The file init_lora names (one of the loras folder's, as LoraLoader lists them), or None."""
    return None if name in (NO_FILE, "") else comfy.lora_path(name)


def init_lora_widget() -> io.Input:
    return comfy.ListedCombo(
        "init_lora", options=[NO_FILE, *comfy.lora_names()], default=NO_FILE, optional=True,
        tooltip="Start from a LoRA of the loras folder instead of from zero (kohya, diffusers, LyCORIS, ComfyUI's "
                "own training nodes or LoRA Lab): its type, rank, alpha and layers become this run's, and the file "
                "itself is the run's step 0. Its weights go on training with a new optimizer state, so this is not "
                "an exact resume (resume is). None = start from zero.")


def requested_name(values: dict) -> str:
    """The run name as typed, checked before anything else happens (a stranger's workflow may say
    '../../somewhere')."""
    return check_output_name(str(values.get("name", "my_lora")).strip() or "my_lora")


def resume_widget() -> io.Combo.Input:
    return io.Combo.Input("resume", options=resume_choices(comfy.lora_root() / comfy.LORA_SUBFOLDER), default=NEW_RUN,
                          optional=True,
                          tooltip="Continue a stopped run exactly where it stopped: 'latest' = the newest checkpoint "
                          "of this training (or of the run called name), or a chosen checkpoint. 'off' starts a new "
                          "run (an existing name gets _2, _3, ...); a run already finished with the same settings, "
                          "dataset and model is handed on without training again.")


def run_value(result: TrainingResult) -> TrainingRun:
    return TrainingRun(result.config.output.name, tuple((c.step, c.path) for c in result.checkpoints),
                       result.trigger_words, result.stopped, result.best.step if result.best else None)


def run_chart(run_dir: Path, title: str):
    """The loss curve as ComfyUI IMAGE, drawn from the run's own files, so a finished run handed on
    again draws exactly the picture its training drew."""
    journal = read_journal(journal_path(run_dir, run_dir.name)) or {}
    log_file = loss_log_path(run_dir, run_dir.name)
    losses = read_loss_log(log_file) if log_file.is_file() else []
    return comfy.pil_to_images([loss_chart(losses, title, [row["step"] for row in journal.get("checkpoints", [])],
                                           [tuple(row) for row in journal.get("validation", [])])])


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID, display_name="Train LoRA (LoRA Lab)", category="LoRA Lab",
            description="LoRA Lab's trainer: trains a LoRA on this graph's model with the guide's presets, shows "
                        "loss, samples and time left on the node, saves resumable checkpoints to "
                        "models/loras/lora_lab/<name>/ (Cancel keeps them) and hands the best one on.",
            **comfy.schema_extras(["lora lab", "lora training", "train lora checkpoints", "kohya", "dreambooth"]),
            inputs=[
                io.Model.Input("model", tooltip="The base model from your checkpoint loader: the LoRA is trained "
                               "on exactly this model."),
                io.Clip.Input("clip", tooltip="Encodes the captions (once, before training)."),
                io.Vae.Input("vae", tooltip="Encodes the images (once, before training)."),
                DATASET.Input("dataset", tooltip="From Load Dataset or Caption."),
                *(settings_input(name) for name in SETTINGS),
                io.Boolean.Input("background", default=False, optional=True, tooltip=BACKGROUND_TOOLTIP),
                *(settings_input(name) for name in SETTINGS_AFTER_BACKGROUND),
                DATASET.Input("reg_dataset", optional=True,
                              tooltip="Regularisation (class) images from a second Load Dataset (lora_type "
                                      "regularisation): a batch of them trains beside every training batch, "
                                      "weighted by prior_loss_weight, so the LoRA changes the class less."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the recommended checkpoint "
                                     "applied at strength 1."),
                     io.Clip.Output(display_name="clip", tooltip="The text encoder with the recommended checkpoint "
                                    "applied."),
                     RUN.Output(display_name="training_run", tooltip="Every checkpoint of the run and the recommended "
                                "one, for Sample Checkpoint and Apply LoRA Stack."),
                     io.Image.Output(display_name="loss_curve"),
                     comfy.LORA_NAME.Output(display_name="lora_name", tooltip="The recommended checkpoint (lowest "
                                            "validation loss; else the last, or the one before the loss rose) as "
                                            "LoraLoader lists it: connect it to LoraLoader's lora_name.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs) -> str:
        """Foreground: constant (ComfyUI caches the run as usual; once its cache has let go, the run
        is found on disk). Background: changes when the job of these settings saves a checkpoint or
        ends, so Train LoRA and the nodes using its run execute again and see it."""
        inputs = widget_history.with_added_defaults(NODE_ID, inputs)
        if not inputs.pop("background"):
            return ""
        job = jobs.JOBS.find_settings(settings_key(node_inputs_as_settings(inputs)))
        return job.token() if job else "new"

    @classmethod
    def execute(cls, model, clip, vae, dataset: DatasetValue, reg_dataset: DatasetValue | None = None,
                **inputs) -> io.NodeOutput:
        check_datasets(dataset, reg_dataset)
        inputs = widget_history.with_added_defaults(NODE_ID, inputs)
        background = bool(inputs.pop("background"))
        settings = node_inputs_as_settings(inputs)
        name, node_id = requested_name(settings), cls.hidden.unique_id
        panel = PanelEvents(node_id, name, comfy.send)
        panel.status("starting", "Loading the model ...")  # the previous run's message goes at once
        try:
            family = graph_model.family_of(model)
            model_name = graph_model.model_file_name(cls.hidden.prompt, node_id)
            identity = RunIdentity(identity_settings(settings, reg_dataset), dataset.fingerprint, dataset.lora_type,
                                   model_name,
                                   graph_model.model_identity(model, model_name).key)
            folder = comfy.lora_root() / comfy.LORA_SUBFOLDER
            plan = plan_run(folder, identity, str(settings["resume"]), jobs.SERVER_SESSION)
        except LoraLabError as error:
            panel.status("failed", str(error))
            raise
        if plan.running and not background:
            raise LoraLabError(f"{plan.message} Turn background on to follow it here, or stop it on its panel.")
        if plan.refusal:
            PanelEvents(node_id, plan.name, comfy.send).status("stopped", plan.refusal)
            raise LoraLabError(plan.refusal)
        if plan.reuse is not None:
            return cls.hand_on_finished(model, clip, plan)
        trigger = {"trigger_word": dataset.trigger_word} if dataset.trigger_word else {}  # typed on Load Dataset
        regularisation = {"reg_dataset": reg_dataset.source} if reg_dataset is not None else {}
        config = node_config({**settings, "family": family.name, **trigger, **regularisation}, folder,
                             dataset.lora_type, plan)
        reg_images = reg_dataset.dataset if reg_dataset is not None else None
        owner = {"node": node_id, "server": jobs.SERVER_SESSION, "identity": identity.record()}
        model_identity = ModelIdentity(model_name, identity.model_key)
        graph = cls.training_graph()
        if background:
            return cls.execute_in_background(model, clip, vae, dataset, settings, config, identity, owner, plan,
                                             graph, reg_images)
        events = comfy.NodeEvents(node_id, config.output.name, config.train.steps or 1)
        events.status("training", f"{plan.message} {starting_note(settings)}Loading the model and encoding the "
                      "dataset ...".strip())
        try:
            with comfy.training_mode():
                loaded = graph_model.loaded_model(model, clip, vae, model_identity, trains_text_encoder(config))
                result = train_lora(config, events, model=loaded, dataset=dataset.dataset, owner=owner, graph=graph,
                                    reg_dataset=reg_images)
                del loaded  # result.model alone holds it now, let go of below
                result.model = None  # the adapter and optimizer go now, before sampling needs the memory
        except LoraLabError as error:
            events.status("failed", str(error))
            raise
        finally:
            comfy.release_training_memory()
        if result.stopped:
            message = stop_message(result)
            log.info(message)
            events.status("stopped", message)
            comfy.raise_interrupted()
        events.status("finished", finish_message(result))
        return cls.hand_on(model, clip, run_value(result), run_chart(result.run_dir, f"{config.output.name}: loss"))

    @classmethod
    def training_graph(cls) -> tuple[dict | None, dict | None]:
        """The workflow (as the frontend queued it) and the prompt of this run's graph, for its files."""
        extra = cls.hidden.extra_pnginfo
        workflow = extra.get("workflow") if isinstance(extra, dict) else None
        return (workflow if isinstance(workflow, dict) else None,
                cls.hidden.prompt if isinstance(cls.hidden.prompt, dict) else None)

    @classmethod
    def hand_on(cls, model, clip, run: TrainingRun, curve) -> io.NodeOutput:
        """The outputs: MODEL and CLIP with the run's recommended checkpoint at strength 1, the run,
        the loss curve (also shown on the node) and the checkpoint's name as LoraLoader lists it."""
        model_out, clip_out = comfy.apply_lora(model, clip, graph_model.lora_for(model, run.best), 1.0, 1.0)
        # The panel draws the loss curve; the curve image is an output only (one chart on the node).
        return io.NodeOutput(model_out, clip_out, run, curve, comfy.lora_display_name(run.best))

    @classmethod
    def hand_on_finished(cls, model, clip, plan: RunPlan) -> io.NodeOutput:
        """A run finished earlier with the same identity, handed on as its training handed it on."""
        run_dir = plan.reuse
        journal = read_journal(journal_path(run_dir, run_dir.name)) or {}
        run = TrainingRun.from_journal(run_dir, journal)
        if not run.checkpoints:
            raise LoraLabError(f"Run {run_dir.name} finished, but its checkpoints are gone from its folder; change "
                               "the name to train it again.")
        PanelEvents(cls.hidden.unique_id, run_dir.name, comfy.send).status(
            "finished", f"{plan.message} {journal.get('message') or ''}".strip(), reused=True)
        return cls.hand_on(model, clip, run, run_chart(run_dir, f"{run_dir.name}: loss"))

    @classmethod
    def execute_in_background(cls, model, clip, vae, dataset: DatasetValue, settings: dict, config: TrainingConfig,
                              identity: RunIdentity, owner: dict, plan: RunPlan,
                              graph: tuple[dict | None, dict | None], reg_images=None) -> io.NodeOutput:
        """Start the job (or find the same training's job) and return what it has saved so far."""
        if not jobs.TURNS.installed:
            raise LoraLabError("Background training needs to run prompts in turns with the job, which this ComfyUI "
                               "version does not allow (see the server log); turn background off.")
        job = jobs.JOBS.start(  # the same training's job when it runs or has finished
            jobs.TrainingJob(name=config.output.name, key=identity.key, settings_key=settings_key(settings),
                             node=cls.hidden.unique_id, total_steps=config.train.steps,
                             message=f"{plan.message} {starting_note(settings)}".strip(),
                             trigger_words=tuple(w for w in [trigger_word_of(config, dataset.dataset)] if w)),
            background_training(config, model, clip, vae, dataset, ModelIdentity(identity.model_name,
                                                                                 identity.model_key),
                                owner, cls.hidden.unique_id, graph, reg_images), comfy.send)
        run = jobs.job_run(job)
        curve = comfy.pil_to_images([loss_chart(job.losses, f"{job.name}: loss ({job.status})",
                                                [step for step, _ in job.checkpoints],
                                                sorted(job.validation.items()))])
        if not run.checkpoints:  # nothing to use yet: the nodes after this one wait for a later queue, quietly
            waiting = comfy.blocked(None)
            return io.NodeOutput(waiting, waiting, waiting, curve, waiting)
        return cls.hand_on(model, clip, run, curve)


def trains_text_encoder(config: TrainingConfig) -> bool:
    """Whether the run trains the text encoder: asked for, or the init_lora file has its layers."""
    return config.lora.train_text_encoder or has_text_encoder_layers(config.lora.init_lora)


def identity_settings(settings: dict, reg_dataset: DatasetValue | None = None) -> dict:
    """The settings a run is recognised by: init_lora's file named with a stamp of its size and time,
    so a file replaced under the same name trains again rather than being handed on; and the
    regularisation images' fingerprint where they are connected (a run without them keeps the
    identity it had before they existed)."""
    path = init_lora_path(settings.get("init_lora", NO_FILE))
    if path is not None:
        settings = {**settings, "init_lora": f"{settings['init_lora']} ({ModelIdentity.of_path(path).key[:12]})"}
    if reg_dataset is not None:
        settings = {**settings, "reg_dataset": reg_dataset.fingerprint}
    return settings


def check_datasets(dataset: DatasetValue, reg_dataset: DatasetValue | None) -> None:
    """The training images in `dataset`, the class images in `reg_dataset`, not the other way round."""
    if dataset.purpose == "regularisation":
        raise LoraLabError("The dataset input has regularisation images (Load Dataset's lora_type): connect them to "
                           "reg_dataset, and the images to learn from to dataset.")
    if reg_dataset is not None and reg_dataset.fingerprint == dataset.fingerprint:
        raise LoraLabError("reg_dataset is the training dataset itself; connect a second Load Dataset with class "
                           "images (lora_type regularisation), or disconnect reg_dataset.")


def starting_note(settings: dict) -> str:
    name = settings.get("init_lora", NO_FILE)
    return "" if name == NO_FILE else (f"Starting from {name}: its weights, with a new optimizer state (not an exact "
                                       "resume). ")


def node_inputs_as_settings(inputs: dict) -> dict:
    """The node's settings from its inputs. A setting added after `background` is left out while it
    holds the value that keeps the old behaviour, so the identity of a run trained before it
    existed (what "queue again" finds it by) stays the same."""
    added = widget_history.history()[NODE_ID]["added"]
    return {**{name: inputs[name] for name in SETTINGS},
            **{name: inputs[name] for name in SETTINGS_AFTER_BACKGROUND if inputs[name] != added[name]}}


def settings_key(settings: dict) -> str:
    """The node's settings as one digest: what a background job's fingerprint follows."""
    chosen = {name: settings.get(name) for name in SETTINGS}
    chosen.update({name: settings[name] for name in SETTINGS_AFTER_BACKGROUND if name in settings})
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def background_training(config: TrainingConfig, model, clip, vae, dataset: DatasetValue, identity: ModelIdentity,
                        owner: dict, node_id: str | None, graph: tuple[dict | None, dict | None],
                        reg_images=None) -> jobs.Trainer:
    """The job's work, run in its own thread in its turns: train as a foreground run does; before a
    pause let go of the base weights, and after it have ComfyUI load the base model whole again and
    share its tensors anew (see nodes/jobs.py)."""
    loaded = []

    def train(events: jobs.JobEvents) -> TrainingResult:
        try:
            with comfy.training_mode():
                loaded.append(graph_model.loaded_model(model, clip, vae, identity, trains_text_encoder(config)))
                return train_lora(config, events, model=loaded[0], dataset=dataset.dataset,
                                  owner={**owner, "background": True}, graph=graph, reg_dataset=reg_images)
        finally:
            loaded.clear()
            comfy.release_training_memory()

    def leave_device() -> None:
        if loaded:
            for module in (loaded[0].denoiser, graph_model.text_stage_of(loaded[0])):
                if module is not None:
                    jobs.release_base_weights(module)

    def back_to_training() -> None:
        stage = graph_model.text_stage_of(loaded[0]) if loaded else None  # when the text encoder trains
        comfy.free_memory_for_training(model, clip if stage is not None else None)
        if loaded:
            jobs.relink_base_weights(loaded[0].denoiser, graph_model.shared_denoiser(model))
        if stage is not None:
            jobs.relink_base_weights(stage, comfy.text_stage(clip))

    return jobs.Trainer(train, leave_device, back_to_training)
