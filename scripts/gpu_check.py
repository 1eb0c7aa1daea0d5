"""The CUDA path, proven in one go: full-size SD 1.5, SDXL and FLUX.1-dev denoisers with random
weights, built on the device (nothing downloaded, no file written but what a resume needs), trained
through the trainer's own loop at rank 32, batch 1, bf16 mixed precision, one option changed at a
time (gradient checkpointing, the fp8 base, AdamW8bit where bitsandbytes is present). One table, also
written as JSON:

- seconds per step (median after warm-up) and the time that makes for 1,000 steps;
- peak GPU memory (torch.cuda.max_memory_allocated and max_memory_reserved) beside the trainer's own
  estimate of it (trainer/budget.py);
- a tiny overfit: the loss finite and falling;
- resume exact on the device: a run stopped and resumed against the unbroken one, measured against
  how far two unbroken runs differ (CUDA's atomics make the backward pass vary run to run);
- a paused run (the background job's pause) leaves no training tensor on the device.

The text and image encodings are random tensors of the family's shapes (`RandomEncoders`): with
cached encodings, which is the default, a step runs the denoiser alone, and that is what is timed.
Cases run while the time budget lasts; the rest are listed as skipped.

On a GPU machine without internet, carry wheels of what it lacks:
    pip download --no-deps diffusers==0.42.1 prodigyopt -d .gpu_wheels      # here
    pip install --no-index --no-deps .gpu_wheels/*.whl && python scripts/gpu_check.py --json $OUT/gpu_check.json
On any CPU, the same script in miniature (the default test suite runs it):
    python scripts/gpu_check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")


def import_lora_lab() -> None:
    """Make `lora_lab` importable from this checkout when it is not installed (a bare GPU machine)."""
    try:
        import lora_lab  # noqa: F401
    except ImportError:
        link = Path(tempfile.mkdtemp()) / "lora_lab"
        link.symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(link.parent))


import_lora_lab()
sys.path.insert(0, str(REPO))

from lora_lab.trainer import run  # noqa: E402
from lora_lab.trainer.budget import GIB  # noqa: E402
from lora_lab.trainer.config import build_config  # noqa: E402
from lora_lab.trainer.data import Dataset, scan_folder  # noqa: E402
from lora_lab.trainer.errors import LoraLabError  # noqa: E402
from lora_lab.trainer.families import get_family  # noqa: E402
from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity  # noqa: E402
from lora_lab.trainer.families.dit import CONFIGS  # noqa: E402
from lora_lab.trainer.families.flux import T5_MAX_TOKENS  # noqa: E402
from lora_lab.trainer.loop import StepReport, TrainingCommands, TrainingEvents, run_loop  # noqa: E402
from lora_lab.trainer.lora import lora_parameters  # noqa: E402
from lora_lab.trainer.precision import precision_name  # noqa: E402

TARGETS = {"full": [("sd15", 512), ("sdxl", 1024), ("flux", 512), ("flux", 1024)],
           "tiny": [("sd15", 64), ("sdxl", 64), ("flux", 64)]}
VARIANTS = {"base": {}, "checkpointing": {"gradient_checkpointing": True}, "fp8_base": {"fp8_base": True},
            "adamw8bit": {"optimizer": "adamw8bit"}}
DENOISER_FOLDER = {"sd15": "unet", "sdxl": "unet", "flux": "transformer"}
STEPS = {"full": (3, 6), "tiny": (1, 2)}  # warm-up steps, timed steps
RANK = 32
TinyModels = dict[str, Path] | None  # family -> a tiny diffusers folder (the dry run), or None: full size


# --- the model: a full-size denoiser with random weights, random encodings ------------------

class RandomEncoders(Encoders):
    """Encodings of the family's shapes, drawn from a fixed seed: captions and images become the
    tensors the real encoders would give, without the encoders' weights."""

    def __init__(self, family: str, config: dict, seed: int = 0) -> None:
        super().__init__()
        self.family, self.config, self.seed = family, config, seed

    def _random(self, shape: tuple[int, ...], salt: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed * 1000 + salt))

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch, config = len(captions), self.config
        if self.family == "flux":
            return {"prompt_embeds": self._random((batch, T5_MAX_TOKENS, config["joint_attention_dim"]), 1),
                    "pooled_projections": self._random((batch, config["pooled_projection_dim"]), 2)}
        text = {"prompt_embeds": self._random((batch, 77, config["cross_attention_dim"]), 1)}
        if self.family == "sdxl":  # the pooled text embedding: what the added conditioning has beside the time ids
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            text["text_embeds"] = self._random((batch, pooled), 2)
        return text

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        channels = self.config["in_channels"] // (4 if self.family == "flux" else 1)  # FLUX packs 2x2 latents
        batch, _, height, width = pixels.shape
        return self._random((batch, channels, height // 8, width // 8), 3)


def denoiser_config(family: str, tiny_models: TinyModels) -> tuple[type, dict]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if family == "flux" else UNet2DConditionModel
    folder = (tiny_models[family] if tiny_models else CONFIGS / family) / DENOISER_FOLDER[family]
    return cls, dict(cls.load_config(folder))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(family: str, device: torch.device, dtype: torch.dtype, tiny_models: TinyModels,
                seed: int = 0) -> LoadedModel:
    """The family's denoiser at its real size, random weights made on the device in the compute
    dtype (FLUX.1-dev's 12 B parameters never exist in fp32)."""
    cls, config = denoiser_config(family, tiny_models)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        denoiser = cls.from_config(config)
    denoiser.requires_grad_(False)
    kind = get_family(family)
    return LoadedModel(family=kind, denoiser=denoiser, encoders=RandomEncoders(family, config, seed),
                       noise_scheduler=kind.training_scheduler(),
                       prediction_type="flow" if family == "flux" else "epsilon",
                       identity=ModelIdentity(name=f"random {family}", key=f"gpu-check-{family}-{seed}-{config}"),
                       resolution=kind.default_resolution)


def one_image_dataset(folder: Path, resolution: int) -> Dataset:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (resolution, resolution), (200, 60, 40)).save(folder / "image.png")
    (folder / "image.txt").write_text("a red square")
    return scan_folder(str(folder))


# --- measuring ------------------------------------------------------------------------------

class Recorder(TrainingEvents, TrainingCommands):
    """Step times and losses; optionally a stop or a pause at a given step."""

    def __init__(self, stop_at: int = 0, pause_at: int = 0, on_pause=None) -> None:
        self.stop_at, self.pause_at, self.on_pause = stop_at, pause_at, on_pause
        self.times: list[float] = []
        self.losses: list[float] = []
        self.step = 0

    def on_step(self, report: StepReport) -> None:
        self.step = report.step
        self.times.append(report.seconds_per_step)
        self.losses.append(report.loss)

    def should_stop(self) -> bool:
        return bool(self.stop_at) and self.step >= self.stop_at

    def pause_requested(self) -> bool:
        return bool(self.pause_at) and self.step == self.pause_at - 1 and self.on_pause is not None

    def pause(self) -> None:
        self.on_pause()
        self.on_pause = None


class Device:
    """What can be measured on the device: peak memory on CUDA, nothing on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peaks(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)


def settings_for(family: str, resolution: int, steps: int, device: torch.device, work: Path, **extra: Any) -> dict:
    return {"family": family, "rank": RANK, "alpha": RANK, "resolution": resolution, "steps": steps,
            "batch_size": 1, "learning_rate": 1e-4, "mixed_precision": "bf16" if device.type == "cuda" else "auto",
            "validation_images": -1, "sample_every": -1, "check_memory": False, "seed": 0, "bucketing": False,
            "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"), "name": "check", "save_every": steps,
            **extra}


def prepared_run(family: str, resolution: int, steps: int, device: Device, work: Path, tiny_models: TinyModels,
                 **extra: Any):
    """A model, its config and what the loop trains on, as train_lora prepares them; and the
    trainer's memory estimate of the run."""
    dataset = one_image_dataset(work / f"data-{resolution}", resolution)
    config = build_config(settings_for(family, resolution, steps, device.device, work, **extra))
    dtype = run.resolve_precision(config.train.mixed_precision, device.device)
    model = build_model(family, device.device, dtype, tiny_models)
    config = run.resolve_config(config, dataset, model)
    estimates = []
    original = run.check_memory

    def keep_estimate(*args, **kwargs):
        estimates.append(original(*args, **kwargs))
        return estimates[-1]

    run.check_memory = keep_estimate
    try:
        prepared = run.prepare_training(model, dataset, Dataset([]), config, ())
    finally:
        run.check_memory = original
    return model, config, prepared, estimates[0]


def timing_case(family: str, resolution: int, variant: str, device: Device, work: Path,
                tiny_models: TinyModels) -> dict:
    device.free()
    row: dict[str, Any] = {"family": family, "resolution": resolution, "case": variant}
    warmup, timed = STEPS["tiny" if tiny_models else "full"]
    steps = warmup + timed
    model = prepared = None
    try:
        model, config, prepared, estimate = prepared_run(family, resolution, steps, device, work, tiny_models,
                                                         **VARIANTS[variant])
        if device.cuda:  # the peak of training, not of building the model (fp8 starts from bf16 weights)
            torch.cuda.reset_peak_memory_stats(device.device)
        events = Recorder()
        run_loop(model, prepared.examples, config, steps, steps, lambda *a: Path("not-saved"), events, events)
    except (LoraLabError, torch.OutOfMemoryError) as error:
        message = str(error)
        row["status"] = "out of memory" if "out of memory" in message.lower() else f"refused: {message[:160]}"
        return row
    else:
        allocated, reserved = device.peaks()
        seconds = statistics.median(events.times[warmup:])
        dtype = run.resolve_precision(config.train.mixed_precision, device.device)
        row.update(status="ok", precision=precision_name(dtype), s_per_step=seconds,
                   minutes_per_1000=seconds * 1000 / 60, peak_allocated=allocated, peak_reserved=reserved,
                   estimate=estimate.total, losses_finite=all(map(math.isfinite, events.losses)))
        return row
    finally:
        del model, prepared
        device.free()


def overfit_check(device: Device, work: Path, tiny_models: TinyModels) -> dict:
    """One image, a high learning rate: the loss must fall (first fifth against last fifth of the run)."""
    device.free()
    resolution, steps = (64, 30) if tiny_models else (256, 60)
    model, config, prepared, _ = prepared_run("sd15", resolution, steps, device, work, tiny_models,
                                              learning_rate=1e-3, name="overfit")
    events = Recorder()
    run_loop(model, prepared.examples, config, steps, steps, lambda *a: Path("not-saved"), events, events)
    fifth = steps // 5
    first, last = statistics.mean(events.losses[:fifth]), statistics.mean(events.losses[-fifth:])
    del model, prepared
    device.free()
    return {"steps": steps, "first": first, "last": last, "finite": all(map(math.isfinite, events.losses)),
            "falling": last < first}


def _final_lora(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(result.final_path)


def resume_check(device: Device, work: Path, tiny_models: TinyModels) -> dict:
    """Two unbroken runs (how far CUDA repeats itself) and one stopped halfway and resumed."""
    resolution, steps = (64, 6) if tiny_models else (512, 6)
    dataset = one_image_dataset(work / f"data-{resolution}", resolution)

    def train(name: str, events: TrainingEvents | None = None, resume: bool = False):
        device.free()
        config = build_config(settings_for("sd15", resolution, steps, device.device, work, name=name,
                                           save_every=steps // 2, resume="latest" if resume else ""))
        dtype = run.resolve_precision(config.train.mixed_precision, device.device)
        return run.train_lora(config, events, model=build_model("sd15", device.device, dtype, tiny_models),
                              dataset=dataset)

    def difference(a: dict, b: dict) -> float:
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    unbroken, again = _final_lora(train("unbroken")), _final_lora(train("again"))
    stopped = train("resumed", Recorder(stop_at=steps // 2))
    resumed = _final_lora(train("resumed", resume=True))
    scale = max(float(t.float().abs().max()) for key, t in unbroken.items() if not key.endswith(".alpha"))
    floor, error = difference(unbroken, again), difference(unbroken, resumed)
    return {"steps": steps, "stopped_at": stopped.checkpoints[-1].step, "repeat_difference": floor,
            "resume_difference": error, "weight_scale": scale,
            # Resumed is as exact as the device repeats itself (bit for bit where it does, as on the CPU).
            "exact": error <= 2 * floor + 1e-6 * scale}


def pause_check(device: Device, work: Path, tiny_models: TinyModels) -> dict:
    """What a paused run keeps on the device (the background job's pause; see loop.parked): every
    live tensor on the device that is not a base weight, counted while the run waits, must be gone.
    `memory_allocated` beyond the base weights is reported beside it (it also counts CUDA's own
    workspaces, which are not the run's)."""
    device.free()
    if not device.cuda:
        return {"status": "n/a on the CPU (a pause leaves everything where it is: host memory)"}
    steps = 4
    model, config, prepared, _ = prepared_run("sd15", 512, steps, device, work, tiny_models, name="pause")
    trained = {id(p) for p in lora_parameters(model)}
    base_weights = [t for t in (*model.denoiser.parameters(), *model.denoiser.buffers()) if id(t) not in trained]
    base, base_ids = sum(t.numel() * t.element_size() for t in base_weights), {id(t) for t in base_weights}
    seen: dict[str, int] = {}

    def during_pause() -> None:
        gc.collect()
        seen["allocated"] = device.allocated() - base
        with warnings.catch_warnings():  # looking at every object touches deprecated torch names
            warnings.simplefilter("ignore")
            seen["tensors"] = sum(t.numel() * t.element_size() for t in gc.get_objects()
                                  if isinstance(t, torch.Tensor) and t.is_cuda and id(t) not in base_ids)

    events = Recorder(pause_at=3, on_pause=during_pause)
    run_loop(model, prepared.examples, config, steps, steps, lambda *a: Path("not-saved"), events, events)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_parameters(model))
    del model, prepared
    device.free()
    return {"status": "ok", "training_tensors_on_device": seen["tensors"], "allocated_beyond_base": seen["allocated"],
            "lora_bytes": lora_bytes, "clear": seen["tensors"] == 0}


# --- the report -----------------------------------------------------------------------------

def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'family':<7}{'px':>5}  {'case':<14}{'dtype':<6}{'s/step':>8}{'min/1k':>8}{'peak GiB':>10}"
             f"{'reserved':>10}{'estimate':>10}  status"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"{row['family']:<7}{row['resolution']:>5}  {row['case']:<14}{'':>60}  {row['status']}")
            continue
        lines.append(f"{row['family']:<7}{row['resolution']:>5}  {row['case']:<14}{row['precision']:<6}"
                     f"{row['s_per_step']:>8.3f}"
                     f"{row['minutes_per_1000']:>8.1f}{_gib(row['peak_allocated']):>10}"
                     f"{_gib(row['peak_reserved']):>10}{_gib(row['estimate']):>10}  "
                     f"{'ok' if row['losses_finite'] else 'loss not finite'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models: the CPU dry run")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; cases left when it is spent are skipped")
    parser.add_argument("--only", default="", help="comma-separated families")
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = Device(torch.device(args.device))
    if device.cuda and not torch.cuda.is_available():
        print("No CUDA device here; for the dry run use --device cpu --tiny.")
        return 2
    started = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device.device) if device.cuda else "cpu",
                              "torch": torch.__version__, "rank": RANK, "batch_size": 1,
                              "rows": []}
    try:
        import bitsandbytes  # noqa: F401
        eight_bit = device.cuda
    except ImportError:
        eight_bit = False
    families = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tiny_models = None
        if args.tiny:
            from tests.tiny_models import build

            tiny_models = {family: build(family, work / "models" / family, "tiny") for family, _ in TARGETS["tiny"]}
        checks = [("overfit", overfit_check), ("resume", resume_check), ("pause", pause_check)]
        for name, check in checks:
            report[name] = check(device, work, tiny_models)
        for family, resolution in TARGETS["tiny" if args.tiny else "full"]:
            if families and family not in families:
                continue
            for variant in VARIANTS:
                if variant == "adamw8bit" and not eight_bit:
                    report["rows"].append({"family": family, "resolution": resolution, "case": variant,
                                           "status": "skipped: needs bitsandbytes on a CUDA GPU"})
                    continue
                if time.perf_counter() - started > args.budget:
                    report["rows"].append({"family": family, "resolution": resolution, "case": variant,
                                           "status": "skipped: time budget spent"})
                    continue
                report["rows"].append(timing_case(family, resolution, variant, device, work, tiny_models))
                print(table(report["rows"][-1:]).splitlines()[-1], flush=True)
    report["seconds"] = time.perf_counter() - started
    print(f"\nLoRA Lab GPU check on {report['device']} (torch {report['torch']}), rank {RANK}, batch 1:")
    print(table(report["rows"]))
    overfit, resume, pause = report["overfit"], report["resume"], report["pause"]
    print(f"overfit: loss {overfit['first']:.4f} -> {overfit['last']:.4f} over {overfit['steps']} steps "
          f"({'falling' if overfit['falling'] else 'NOT falling'}, {'finite' if overfit['finite'] else 'NOT finite'})")
    print(f"resume: stopped at {resume['stopped_at']} of {resume['steps']}; resumed vs unbroken max |diff| "
          f"{resume['resume_difference']:.3g}, two unbroken runs {resume['repeat_difference']:.3g} "
          f"(weights up to {resume['weight_scale']:.3g}): {'exact' if resume['exact'] else 'NOT exact'}")
    print(f"pause: {pause['status'] if pause['status'] != 'ok' else _pause_line(pause)}")
    print(f"{report['seconds']:.0f} s in all")
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    ok = (overfit["falling"] and overfit["finite"] and resume["exact"] and pause.get("clear", True)
          and all(row.get("losses_finite", True) for row in report["rows"]))
    return 0 if ok else 1


def _pause_line(pause: dict) -> str:
    return (f"{pause['training_tensors_on_device'] / 2**20:.2f} MiB of training tensors on the device while "
            f"paused (LoRA {pause['lora_bytes'] / 2**20:.1f} MiB moved off; allocated beyond the base weights "
            f"{pause['allocated_beyond_base'] / 2**20:.1f} MiB, CUDA's workspaces included): "
            f"{'clear' if pause['clear'] else 'NOT clear'}")


if __name__ == "__main__":
    sys.exit(main())
