"""Benchmark the trainer per family and option: seconds per step; a step's FLOPs (torch's FLOP
counter over forward and backward) and the share of the machine's measured fp32 matmul peak the
step achieves; the base model's size; the peak of tensor bytes alive in the loop (a dispatch-mode
counter, `budget.LiveTensorBytes`: what training adds, not RSS) and the trainer's memory estimate
of that same quantity. Each case runs in its own process, side by side in one run. Models are
random, built from configs (tests/tiny_models.py); sd15 at "tiny" size is the shipped demo model.

    python scripts/benchmark_trainer.py [--steps 20] [--families sd15,sdxl,flux,zimage] [--sizes tiny,reduced]
                                        [--cases plain,no_cache,checkpointing,text_encoder,fp8_base,
                                                 loha,lokr,dora,adafactor,lion,adamw_schedulefree,
                                                 prodigy_schedulefree,reg,masked,augment,multi_res]

Absolute times on shared machines are noisy: compare the ratios between cases of one run.

    python scripts/benchmark_trainer.py --real-size flux|zimage|flux2

prints instead the trainer's own memory estimate (budget.py, on the meta device: no weights, no
arithmetic, seconds on any machine) for full-size FLUX.1-dev, Z-Image or FLUX.2 [klein] 4B on a
GPU: 512 and 1024 px, bf16 and fp8 base, with and without gradient checkpointing, batch 1, rank 16
and 32.

    python scripts/benchmark_trainer.py --file-sizes

prints each adapter type's file size at rank 32 on each family's full-size denoiser (meta device).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"plain": {}, "no_cache": {"cache": False}, "checkpointing": {"gradient_checkpointing": True},
         "text_encoder": {"train_text_encoder": True}, "fp8_base": {"fp8_base": True},
         "loha": {"adapter": "loha"}, "lokr": {"adapter": "lokr"}, "dora": {"adapter": "dora"},
         "adafactor": {"optimizer": "adafactor"},
         "lion": {"optimizer": "lion"},
         "adamw_schedulefree": {"optimizer": "adamw_schedulefree", "lr_scheduler": "constant"},
         "prodigy_schedulefree": {"optimizer": "prodigy_schedulefree", "lr_scheduler": "constant",
                                  "learning_rate": 1.0},
         # The data features: DATA_FOLDERS' sets stand in for "{reg}" and "{masked}".
         "reg": {"reg_dataset": "{reg}"}, "masked": {"dataset": "{masked}", "masked_loss": True},
         "augment": {"flip_augment": True, "color_jitter": 0.1, "random_crop": True},
         "multi_res": {"resolutions": "{half},{full}"}}
NOT_FOR = {"text_encoder": {"flux", "zimage", "flux2"}}  # their LoRAs train the transformer only
RESOLUTION = {"tiny": 64, "reduced": 128}


# Steps 1-2 count live tensor bytes (step 2 is the first with the optimizer's state alive through
# the backward pass, as in every later step), step 3 FLOPs; the steps after them are timed.
LIVE_STEPS = 2
MEASURED_STEPS = 3


def write_data_folders(root: Path) -> dict[str, str]:
    """The sets the data-feature cases train on: 24 base-world class images (regularisation) and the
    embedded concept dataset with a mask over each image's middle."""
    import random

    from lora_lab.trainer import embedded
    from lora_lab.trainer.embedded import synthetic
    from PIL import Image

    reg, masked = root / "reg", root / "masked"
    reg.mkdir()
    rng = random.Random(11)
    for index in range(24):
        image, caption = synthetic.base_sample(rng)
        image.save(reg / f"class_{index:02d}.png")
        (reg / f"class_{index:02d}.txt").write_text(caption)
    shutil.copytree(embedded.CONCEPT_DATASET, masked)
    for path in masked.rglob("*.png"):
        width, height = Image.open(path).size
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (width // 8, height // 8, width * 7 // 8, height * 7 // 8))
        mask.save(path.with_name(path.stem + "_mask.png"))
    return {"reg": str(reg), "masked": str(masked)}


def matmul_peak(seconds: float = 3.0, side: int = 2048) -> float:
    """The machine's fp32 matmul rate in FLOP/s with the threads torch uses: the ceiling a training
    step's arithmetic can approach."""
    import time

    import torch

    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)  # warm up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * side**3 * count / (time.perf_counter() - started)


def flop_counter():
    """torch's FLOP counter, also counting the CPU's own flash-attention kernels (it knows only the
    GPU ones) by the same formulas."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments are shapes here
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


def run_case(settings: dict) -> dict:
    """Runs inside the child process: measures around the training loop only. The first two steps
    are counted for live tensor bytes, the third for FLOPs (both slow a step down), and the steps
    after them are timed."""
    import statistics

    from lora_lab.trainer import budget, run
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.loop import TrainingEvents
    from lora_lab.trainer.lora import lora_parameters

    measured: dict = {"times": []}
    original_loop, original_check = run.run_loop, budget.check_memory

    def check(*args, **kwargs):
        estimate = original_check(*args, **kwargs)
        measured["estimate"], measured["base"] = estimate.training, estimate.base
        return estimate

    class Measuring(TrainingEvents):
        """Live tensor bytes over steps 1 and 2 (step 1 creates the optimizer's state, which step 2
        holds through its backward pass), then FLOPs over step 3: apart, because the FLOP counter's
        module hooks keep tensors alive that training would free (with gradient checkpointing, a
        third more)."""

        def __init__(self, inner: TrainingEvents, live: budget.LiveTensorBytes) -> None:
            self.inner, self.live, self.flops = inner, live, flop_counter()

        def on_step(self, report) -> None:
            if report.step == LIVE_STEPS:
                self.live.__exit__(None, None, None)
                measured["peak_live"] = self.live.peak
                self.flops.__enter__()
            elif report.step == MEASURED_STEPS:
                self.flops.__exit__(None, None, None)
                measured["flops"] = self.flops.get_total_flops()
            elif report.step > MEASURED_STEPS:
                measured["times"].append(report.seconds_per_step)
            self.inner.on_step(report)

        def on_checkpoint(self, checkpoint) -> None:
            self.inner.on_checkpoint(checkpoint)

        def on_validation(self, step, loss) -> None:
            self.inner.on_validation(step, loss)

        def on_samples(self, sheet) -> None:
            self.inner.on_samples(sheet)

        def on_pause(self) -> None:
            self.inner.on_pause()

    def loop(model, examples, config, total_steps, save_every, save, events, *args, **kwargs):
        # The LoRA weights exist before the loop; the estimate counts them with their gradients.
        measured["lora_bytes"] = sum(p.numel() * p.element_size() for p in lora_parameters(model))
        live = budget.LiveTensorBytes()
        live.__enter__()
        return original_loop(model, examples, config, total_steps, save_every, save, Measuring(events, live),
                             *args, **kwargs)

    run.run_loop, run.check_memory = loop, check
    with tempfile.TemporaryDirectory() as folder:
        run.train_lora(build_config({**settings, "output_dir": folder}))
    times = measured.pop("times")
    return {**measured, "s_per_step": statistics.median(times), "peak": measured["peak_live"] + measured["lora_bytes"]}


# The text conditioning of one caption at full size, per transformer family: what a real step sees.
REAL_SIZE_TEXT = {"flux": {"prompt_embeds": (512, 4096), "pooled_projections": (768,)},
                  "zimage": {"prompt_embeds": (512, 2560), "prompt_mask": (512,)},
                  "flux2": {"prompt_embeds": (512, 7680)}}
PIXELS_PER_LATENT = {"flux": 8, "zimage": 8, "flux2": 16}  # FLUX.2's VAE latents are folded 2x2


def full_size_denoiser(name: str):
    """A family's full-size denoiser (its shipped config) on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.sd15 import CONFIGS

    family = get_family(name)
    transformer = getattr(family, "pipeline_class_transformer", None)
    cls, folder = (transformer(), "transformer") if transformer else (UNet2DConditionModel, "unet")
    with torch.device("meta"):
        return cls.from_config(cls.load_config(CONFIGS / name / folder))


def real_size(name: str) -> None:
    """The memory table of a full-size transformer family from the trainer's estimate (see the
    module docstring)."""
    import itertools

    import torch
    from lora_lab.trainer import budget
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity
    from lora_lab.trainer.fp8 import float8_bytes_saved
    from lora_lab.trainer.lora import add_lora, lora_parameters

    family = get_family(name)
    denoiser = full_size_denoiser(name)
    linear = sum(m.weight.numel() for m in denoiser.modules() if type(m) is torch.nn.Linear)
    everything = sum(p.numel() for p in denoiser.parameters())
    # bf16 weights; fp8: one byte per linear weight plus its per-row fp32 scale, the rest in bf16.
    base = {"bf16": 2 * everything,
            "fp8": 2 * everything - float8_bytes_saved(denoiser, element_size=2, kept=family.fp8_kept)}
    gib = 2**30
    print(f"{family.title} transformer: {everything / 1e9:.2f} B parameters, {linear / everything:.1%} in linear "
          "layers; text encoders not counted (their encodings are cached before training, and ComfyUI offloads them).")
    print("GiB on a CUDA GPU, batch 1, AdamW (8-bit AdamW: optimizer column / 4), runtime 0.59 GiB included")
    print(f"{'px':>5}{'base':>6}{'checkpointing':>15}{'rank':>6}{'base GiB':>10}{'LoRA':>7}{'optimizer':>11}"
          f"{'step':>7}{'total':>8}")
    for resolution, dtype, checkpointing, rank in itertools.product((512, 1024), ("bf16", "fp8"), (False, True),
                                                                    (16, 32)):
        config = build_config({"family": name, "rank": rank, "resolution": resolution, "batch_size": 1,
                               "gradient_checkpointing": checkpointing, "fp8_base": dtype == "fp8"})
        with torch.device("meta"):
            model = LoadedModel(family=family, denoiser=type(denoiser).from_config(denoiser.config),
                                encoders=Encoders(), noise_scheduler=None, prediction_type="flow",
                                identity=ModelIdentity(family.title, "meta"), resolution=1024, guidance=3.5)
        add_lora(model, rank, config.alpha, config.lora.targets, train_text_encoder=False)
        lora = lora_parameters(model)
        side = resolution // PIXELS_PER_LATENT[name]
        latents = torch.empty((1, family.latent_channels(model), side, side), device="meta")
        conditioning = {key: torch.empty((1, *shape), dtype=torch.bfloat16, device="meta")
                        for key, shape in REAL_SIZE_TEXT[name].items()}
        step = budget.measure_step(model, config, latents, conditioning, torch.bfloat16)
        estimate = budget.MemoryEstimate(
            base=base[dtype], adapters=sum(p.numel() for p in lora) * 4,
            optimizer=sum(p.numel() for p in lora) * budget.OPTIMIZERS["adamw"].state_bytes,
            step=step, overhead=budget.CUDA_OVERHEAD)
        print(f"{resolution:>5}{dtype:>6}{'on' if checkpointing else 'off':>15}{rank:>6}{estimate.base / gib:>10.2f}"
              f"{estimate.adapters / gib:>7.2f}{estimate.optimizer / gib:>11.2f}{step / gib:>7.2f}"
              f"{estimate.total / gib:>8.2f}")


def file_sizes(rank: int = 32) -> None:
    """Each adapter type's file size on each family's full-size denoiser (the shipped configs, on
    the meta device: no weights), at `rank` on the default targets, as the exporter writes it
    (fp16 tensors, an fp32 alpha per layer)."""
    from lora_lab.trainer.adapters import ADAPTER_NAMES, adapter_of_layer
    from lora_lab.trainer.families import FAMILY_NAMES, get_family
    from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity
    from lora_lab.trainer.lora import add_lora, lora_layers

    print(f"MiB per file at rank {rank}, default targets, denoiser only ({', '.join(ADAPTER_NAMES)})")
    for name in FAMILY_NAMES:
        sizes = []
        for adapter in ADAPTER_NAMES:
            denoiser = full_size_denoiser(name)
            model = LoadedModel(family=get_family(name), denoiser=denoiser, encoders=Encoders(), noise_scheduler=None,
                                prediction_type="flow", identity=ModelIdentity(name, "meta"), resolution=1024)
            add_lora(model, rank, rank, "attention", train_text_encoder=False, adapter=adapter)
            layers = lora_layers(denoiser)
            numbers = sum(p.numel() for _, layer in layers for _, p in adapter_of_layer(layer).roles(layer))
            sizes.append((2 * numbers + 4 * len(layers)) / 2**20)
        cells = zip(ADAPTER_NAMES, sizes, strict=True)
        print(f"{name:<6}" + "".join(f"{adapter:>7} {size:7.1f}" for adapter, size in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", default="sd15,sdxl,flux")
    parser.add_argument("--sizes", default="tiny,reduced")
    parser.add_argument("--cases", default="plain,checkpointing,fp8_base")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--real-size", choices=sorted(REAL_SIZE_TEXT), help="print a full-size memory table instead")
    parser.add_argument("--file-sizes", action="store_true", help="print each adapter type's full-size file sizes")
    args = parser.parse_args()
    if args.real_size:
        real_size(args.real_size)
        return
    if args.file_sizes:
        file_sizes()
        return
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build

    peak = matmul_peak()
    print(f"fp32 matmul peak of this machine: {peak / 1e9:.0f} GFLOP/s ({__import__('torch').get_num_threads()} "
          "threads)")
    print(f"{'family':<7}{'size':<9}{'case':<15}{'s/step':>8}{'GFLOP/step':>11}{'of peak':>8}{'base MiB':>10}"
          f"{'live MiB':>10}{'estimate MiB':>14}{'ratio':>7}")
    with tempfile.TemporaryDirectory() as models:
        folders = write_data_folders(Path(models))
        for family in args.families.split(","):
            for size in args.sizes.split(","):
                folder = build(family, Path(models) / f"{family}-{size}", size)
                for case in args.cases.split(","):
                    if family in NOT_FOR.get(case, ()):
                        continue
                    settings = {"family": family, "base_model": str(folder), "steps": args.steps, "rank": 16,
                                "batch_size": 2, "resolution": RESOLUTION[size], "save_every": args.steps,
                                "validation_images": -1, "sample_every": -1, "name": case,
                                **{key: value.format(**folders, full=RESOLUTION[size], half=RESOLUTION[size] // 2)
                                   if isinstance(value, str) else value for key, value in CASES[case].items()}}
                    output = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], check=True,
                                            capture_output=True, text=True).stdout
                    row = json.loads(output.strip().splitlines()[-1])
                    live, estimate = row["peak"] / 2**20, row["estimate"] / 2**20
                    utilisation = row["flops"] / row["s_per_step"] / peak
                    print(f"{family:<7}{size:<9}{case:<15}{row['s_per_step']:>8.3f}{row['flops'] / 1e9:>11.2f}"
                          f"{utilisation:>8.0%}{row['base'] / 2**20:>10.1f}{live:>10.1f}{estimate:>14.1f}"
                          f"{estimate / max(live, 0.1):>7.2f}")


if __name__ == "__main__":
    main()
