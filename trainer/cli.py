"""Command line: `python -m lora_lab demo` trains on the embedded default; `python -m lora_lab train`
trains from a config file and/or flags. Every setting of the config is a flag with its help,
default and range; Ctrl+C saves a checkpoint and exits cleanly (press it twice to abort)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

# Library chatter (transformers' note that torchvision is absent, loading bars) stays off the
# console; these must be set before diffusers and transformers are first imported, just below.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from .config import build_config, field_specs, load_settings_file  # noqa: E402
from .doctor import LORA_TYPES  # noqa: E402
from .errors import LoraLabError  # noqa: E402
from .families import DEFAULT_FAMILY, FAMILY_NAMES  # noqa: E402
from .loop import Checkpoint, StepReport, TrainingCommands, TrainingEvents  # noqa: E402

# The demo must finish in a minute, so its learning rate is ten times the guide's first attempt
# for real models. Feed-forward targets and Min-SNR weighting (which gives the noisy steps, where
# a shape is laid out, their share) let the LoRA change the shape drawn, not just its colour:
# measured on the embedded model, attention alone (rank 8, lr 3e-4 to 1e-3) turned the shapes blue
# but drew the ring with its dot in at most 1 of 9 samples; these settings in 9 of 9.
DEMO_SETTINGS: dict[str, Any] = {
    "steps": 300, "rank": 32, "learning_rate": 1e-3, "targets": "attention_mlp", "min_snr_gamma": 5.0,
    "batch_size": 4, "save_every": 100,
    "output_dir": "lora_lab_demo", "name": "zkw_toy", "overwrite": True,
    "prompts": ("{trigger}, white background", "{trigger}, black background", "{trigger}, gray background"),
    "strengths": (0.0, 0.5, 1.0),
}


class ConsoleEvents(TrainingEvents, TrainingCommands):
    """A tqdm bar with loss and learning rate; Ctrl+C asks the loop to save and stop."""

    def __init__(self, shown: bool = True) -> None:
        self.bar: tqdm | None = None
        self.shown = shown  # several training processes: the main one shows the progress
        self.stop_requested = False

    def on_step(self, report: StepReport) -> None:
        if self.bar is None:
            self.bar = tqdm(total=report.total_steps, unit="step", dynamic_ncols=True, disable=not self.shown)
        self.bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.learning_rate:.2e}")
        self.bar.update(1)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self.shown:
            tqdm.write(f"saved {checkpoint.path}")

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, *_: Any) -> None:
        tqdm.write("Stopping after this step and saving a checkpoint (press Ctrl+C again to abort).")
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section, each with help, default and range."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, spec) in field_specs().items():
        group = groups.setdefault(section, parser.add_argument_group(f"{section} settings"))
        meta = spec.metadata
        default = spec.default if not callable(spec.default_factory) else spec.default_factory()
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        extra = f" Default: {shown!r}."
        if meta["choices"]:
            extra += f" Choices: {', '.join(meta['choices'])}."
        elif meta["low"] is not None:
            extra += f" Range: {meta['low']:g} to {meta['high']:g}."
        if isinstance(default, tuple):
            extra += " Separate several with " + ("'|'." if name == "prompts" else "','.")
        metavar = "BOOL" if isinstance(default, bool) else name.upper()
        group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, metavar=metavar,
                           help=(meta["help"] + extra).replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train on the embedded tiny model and dataset (CPU, ~2 minutes)",
                               description="Train a LoRA on the embedded tiny model and concept dataset, then "
                                           "write checkpoints, a loss curve and a checkpoint x strength grid. "
                                           f"Demo defaults: {DEMO_SETTINGS}. Any setting below overrides them.")
    train = commands.add_parser("train", help="train a LoRA on your own model and dataset",
                                description="Train a LoRA. Settings come from --config (TOML or JSON, "
                                            "sections optional) and flags; flags win, and a preset fills in "
                                            "what neither sets.")
    doctor = commands.add_parser("doctor", help="check a dataset against the guide before training",
                                 description="Check a dataset folder against the guide's checklist (count, "
                                             "resolution, blur, exposure, duplicates, variety, captions, trigger "
                                             "word) and print what to fix. Changes nothing. Exits 1 when a finding "
                                             "would stop training.")
    doctor.add_argument("folder", type=Path, help="the dataset folder")
    doctor.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILY_NAMES, help="the base model's family "
                        "(its training size and caption style)")
    doctor.add_argument("--lora-type", default="style", choices=LORA_TYPES, help="what the LoRA is for (the "
                        "guide's image counts differ)")
    doctor.add_argument("--trigger-word", default="", help="the trigger word (default: the N_name folder's name)")
    doctor.add_argument("--reg-dataset", type=Path, help="also check this folder of regularisation (class) images: "
                        "count against the training set, captions without the trigger word")
    doctor.add_argument("--flip-augment", action="store_true", help="say what flip_augment risks for this set")
    doctor.add_argument("--sheet", type=Path, help="also save a contact sheet of the flagged images here (PNG)")
    doctor.add_argument("--prompt", action="append", default=[], help="a sample prompt you will test with "
                        "({trigger} filled in; repeat the flag for more): flagged if it repeats a caption")
    train.add_argument("--from-lora", type=Path, metavar="FILE",
                       help="train again with the settings a LoRA Lab file records, on a new --dataset (the config "
                            "file and flags change any of them; the differences are listed)")
    for sub in (demo, train):
        sub.add_argument("--config", type=Path, help="TOML or JSON file of settings")
        sub.add_argument("--no-samples", action="store_true",
                         help="no samples: none while training (unless --sample-every is given), no grid after")
        add_setting_flags(sub)
    return parser


def gather_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line asks for: the demo's defaults, then the config file, then flags."""
    settings = dict(DEMO_SETTINGS) if args.command == "demo" else {}
    if args.config:
        settings.update(load_settings_file(args.config))
    settings.update({name: getattr(args, name) for name in field_specs() if hasattr(args, name)})
    if args.no_samples:
        settings.setdefault("sample_every", -1)
    if getattr(args, "from_lora", None):
        from .retrain import retrain_settings

        settings = retrain_settings(args.from_lora, settings)
    return settings


def quiet_libraries() -> None:
    """No loading bars from the libraries: the CLI shows its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def run_doctor(args: argparse.Namespace) -> int:
    from .data import scan_folder
    from .doctor import DoctorReport, Finding, augmentation_findings, examine, examine_regularisation, flagged_sheet

    try:
        dataset = scan_folder(args.folder)
    except LoraLabError as error:
        print(DoctorReport([Finding("count", "stop", str(error))]).text())
        return 1
    trigger = args.trigger_word or (dataset.trigger_words[0] if len(dataset.trigger_words) == 1 else "")
    from .sampling import fill_trigger  # the way a run fills the prompts it samples

    prompts = tuple(fill_trigger(prompt, [trigger] if trigger else []) for prompt in args.prompt)
    report = examine(dataset, args.family, args.lora_type, trigger, prompts)
    if args.flip_augment:
        report.findings += augmentation_findings(build_config({"flip_augment": True}).data)
    print(report.text())
    blocking = report.blocking
    if args.reg_dataset:
        try:
            regularisation = examine_regularisation(scan_folder(args.reg_dataset), trigger, len(dataset.items))
        except LoraLabError as error:
            regularisation = DoctorReport([Finding("count", "stop", str(error))])
        print(f"\nRegularisation images ({args.reg_dataset}):\n{regularisation.text()}")
        blocking = blocking or regularisation.blocking
    if args.sheet:
        from .files import atomic_save_image

        sheet = flagged_sheet(dataset, report)
        if sheet is not None:
            atomic_save_image(args.sheet, sheet)
            print(f"Flagged images: {args.sheet}")
    return 1 if blocking else 0


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` answers at once, without loading torch and diffusers.
    quiet_libraries()
    from .charts import loss_chart
    from .files import atomic_save_image
    from .parallel import processes
    from .run import train_lora
    from .sampling import fill_trigger, sample_grid

    config = build_config(gather_settings(args))
    if getattr(args, "from_lora", None):
        from .retrain import differences

        changed = differences(args.from_lora, config)
        print(f"Training again from {args.from_lora.name}, with {len(changed)} change(s):"
              + "".join(f"\n  {line}" for line in changed))
    events = ConsoleEvents(shown=processes().main)
    previous_handler = signal.signal(signal.SIGINT, events.request_stop)
    started = time.time()
    try:
        result = train_lora(config, events)
    finally:
        events.close()
        signal.signal(signal.SIGINT, previous_handler)
    if not processes().main:  # several training processes: the main one writes and reports
        return 130 if result.stopped else 0
    name = result.config.output.name
    plot_path = result.run_dir / f"{name}-loss.png"
    atomic_save_image(plot_path, loss_chart(result.losses, f"{name}: loss per step",
                                            [c.step for c in result.checkpoints], result.validation))
    print(f"Loss curve: {plot_path}")
    print(f"Loss curve diagnosis: {result.diagnosis}")
    if result.best is not None:
        print(f"Recommended checkpoint: {result.best.path}")
    if result.stopped:
        print(f"Stopped at step {result.checkpoints[-1].step}; saved {result.final_path}. Continue with the same "
              "command plus --resume latest.")
    if not args.no_samples and not result.stopped:
        sample_settings = result.config.sample
        prompts = [fill_trigger(p, result.trigger_words) for p in sample_settings.prompts]
        size = (result.config.data.resolution,) * 2
        best = result.best.path if result.best is not None else None
        rows = [(f"step {c.step}" + (" (recommended)" if c.path == best else ""), c.path) for c in result.checkpoints]
        result.model.encoders.place(result.model.device)  # back beside the denoiser after training
        grid, cells = sample_grid(result.model, rows, prompts, sample_settings.strengths, size,
                                  sample_settings.sample_steps, sample_settings.guidance_scale,
                                  sample_settings.sample_seed)
        grid_path = result.run_dir / f"{name}-grid.png"
        atomic_save_image(grid_path, grid)
        print(f"Sample grid (rows: checkpoints, columns: strengths): {grid_path}")
        if args.command == "demo":
            from .embedded.synthetic import concept_present

            final = rows[-1][0]
            for strength in sample_settings.strengths:
                found = sum(concept_present(cells[(final, p, strength)]) for p in prompts)
                print(f"Concept (a blue ring around a red dot) at strength {strength:g}: in {found} of "
                      f"{len(prompts)} samples of the final checkpoint")
    print(f"LoRA: {result.final_path}  ({len(result.checkpoints)} checkpoints in {result.run_dir}, "
          f"{time.time() - started:.0f} s)")
    return 130 if result.stopped else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run_doctor(args) if args.command == "doctor" else run(args)
    except LoraLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        return 130
