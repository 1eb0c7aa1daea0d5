"""Our trainer side by side with what a user would run instead: the diffusers LoRA example script
(examples/text_to_image/train_text_to_image_lora.py from the diffusers repository; pass its path,
never commit it). Both train the same model, data, rank, targets (attention), batch, resolution
and step count, alternately, in one invocation, on whatever device is present.

    python scripts/benchmark_side_by_side.py --diffusers-script PATH [--sizes 256,512] [--steps 10]
                                             [--rounds 2] [--threads 1]

The model is the full-size SD 1.5 architecture with random weights, built from the configs the
package ships (no download): the full-size VAE and text encoder matter, because the example
re-encodes every image through the VAE on every step while we encode once. The example needs
torchvision, `datasets` and `accelerate`.

Both are timed the same way without changing either: a `sitecustomize` on PYTHONPATH registers a
global optimizer post-step hook that records the time of every step, and the peak RSS (and peak
CUDA memory) at exit. Printed per size and trainer: steady-state seconds per step (median of the
steps after the first two), time from process start to the first step, the whole run's wall
time, peak RSS, and the ratios ours ÷ theirs. Then how near our step comes to the machine's limit:
its FLOPs (torch's FLOP counter over the UNet's forward and backward with the LoRA, counted on the
meta device) against the fp32 matmul peak measured with the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_trainer import flop_counter, matmul_peak  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainer" / "families" / "configs" / "sd15"
IMAGES = 8
RANK = 16
LEARNING_RATE = 1e-4

STEP_TIMER = '''
import atexit, json, os, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_log = os.environ["LORA_LAB_BENCH_LOG"]
_started = float(os.environ["LORA_LAB_BENCH_START"])
_steps = []

def _record(optimizer, args, kwargs):
    _steps.append(time.time())

register_optimizer_step_post_hook(_record)

def _write():
    peak = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    with open(_log, "w") as out:
        json.dump({"start": _started, "steps": _steps, "peak_rss": peak, "peak_cuda": cuda}, out)

atexit.register(_write)
'''


def build_model(folder: Path) -> Path:
    """The full-size SD 1.5 architecture with random weights, as a diffusers folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    unet.save_pretrained(folder / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae")).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder")).save_pretrained(folder / "text_encoder")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(CONFIGS / part, folder / part, dirs_exist_ok=True)
    shutil.copy(CONFIGS / "model_index.json", folder / "model_index.json")
    return folder


def build_datasets(folder: Path, size: int) -> tuple[Path, Path]:
    """The same images and captions in both layouts: ours (image + .txt) and an imagefolder with
    metadata.jsonl for the example."""
    from PIL import Image, ImageDraw

    ours, theirs = folder / f"ours-{size}", folder / f"theirs-{size}"
    ours.mkdir(parents=True, exist_ok=True)
    theirs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(size)
    rows = []
    for index in range(IMAGES):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.ellipse((x, y, x + size // 3, y + size // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
        caption = f"xyz_bench, picture {index}, coloured circles"
        for target in (ours, theirs):
            image.save(target / f"{index:02d}.png")
        (ours / f"{index:02d}.txt").write_text(caption)
        rows.append(json.dumps({"file_name": f"{index:02d}.png", "text": caption}))
    (theirs / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return ours, theirs


def commands(model: Path, ours: Path, theirs: Path, size: int, steps: int, output: Path,
             script: Path) -> dict[str, list[str]]:
    return {
        "ours": [sys.executable, "-m", "lora_lab", "train", "--base-model", str(model), "--dataset", str(ours),
                 "--resolution", str(size), "--batch-size", "1", "--steps", str(steps), "--rank", str(RANK),
                 "--alpha", str(RANK), "--targets", "attention", "--learning-rate", str(LEARNING_RATE),
                 "--lr-scheduler", "constant", "--warmup-steps", "0", "--mixed-precision", "no",
                 "--save-every", str(steps), "--validation-images", "-1", "--no-samples", "--overwrite", "true",
                 "--output-dir", str(output), "--name", f"ours-{size}"],
        "theirs": [sys.executable, str(script), "--pretrained_model_name_or_path", str(model),
                   "--train_data_dir", str(theirs), "--image_column", "image", "--caption_column", "text",
                   "--resolution", str(size), "--train_batch_size", "1", "--max_train_steps", str(steps),
                   "--rank", str(RANK), "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant",
                   "--lr_warmup_steps", "0", "--mixed_precision", "no", "--dataloader_num_workers", "0",
                   "--checkpointing_steps", str(steps * 10), "--seed", "0",
                   "--output_dir", str(output / f"theirs-{size}")],
    }


def measure(command: list[str], timer_dir: Path, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as log:
        log_path = Path(log.name)
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(timer_dir), os.environ.get("PYTHONPATH", "")]),
           "LORA_LAB_BENCH_LOG": str(log_path), "LORA_LAB_BENCH_START": str(start), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if finished.returncode != 0:
        raise SystemExit(f"{command[1]} failed:\n{finished.stderr[-4000:]}")
    record = json.loads(log_path.read_text())
    log_path.unlink()
    steps = record["steps"]
    if not steps:
        raise SystemExit(f"{command[1]} recorded no optimizer step: is the step timer on PYTHONPATH?")
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)][1:]  # after the first two steps
    return {"s_per_step": statistics.median(gaps) if gaps else float("nan"), "first_step": steps[0] - start,
            "wall": wall, "peak_rss": record["peak_rss"], "peak_cuda": record["peak_cuda"], "steps": len(steps)}


def step_flops(size: int) -> int:
    """The FLOPs of one of our training steps at `size` px, batch 1: the full-size UNet with the
    benchmark's LoRA, forward and backward, counted on the meta device (no weights, no time)."""
    import torch
    from diffusers import UNet2DConditionModel
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity
    from lora_lab.trainer.lora import add_lora


    family = get_family("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    unet.requires_grad_(False)
    probe = LoadedModel(family=family, denoiser=unet, encoders=Encoders(), noise_scheduler=None,
                        prediction_type="epsilon", identity=ModelIdentity(name="bench", key=""), resolution=size)
    add_lora(probe, RANK, RANK, "attention", train_text_encoder=False)
    noisy = torch.empty((1, 4, size // 8, size // 8), device="meta")
    text = torch.empty((1, 77, unet.config.cross_attention_dim), device="meta")
    with flop_counter() as counter:
        prediction = family.predict(probe, noisy, torch.zeros(1, dtype=torch.long, device="meta"),
                                    {"prompt_embeds": text})
        torch.nn.functional.mse_loss(prediction, torch.empty_like(prediction)).backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", type=Path, required=True,
                        help="path of diffusers' examples/text_to_image/train_text_to_image_lora.py")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="times each trainer runs, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora_lab_side_by_side")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    timer_dir = args.work / "timer"
    timer_dir.mkdir(exist_ok=True)
    (timer_dir / "sitecustomize.py").write_text(STEP_TIMER)
    model = build_model(args.work / "sd15-random")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        ours, theirs = build_datasets(args.work / "data", size)
        runs = commands(model, ours, theirs, size, args.steps, args.work / "output", args.diffusers_script)
        results: dict[str, list[dict]] = {"ours": [], "theirs": []}
        for _ in range(args.rounds):
            for name in ("theirs", "ours"):
                results[name].append(measure(runs[name], timer_dir, args.threads))
                print(f"{size} px {name}: {results[name][-1]}", flush=True)
        rows.append((size, {name: {key: statistics.median(r[key] for r in runs_) for key in runs_[0]}
                            for name, runs_ in results.items()}))
    print(f"\nfull-size SD 1.5, random weights, batch 1, rank {RANK} on attention, {args.steps} steps, "
          f"{args.threads} thread(s), median of {args.rounds} alternating runs each")
    print(f"{'size':>5} {'trainer':<8}{'s/step':>8}{'first step s':>14}{'wall s':>8}{'peak RSS GB':>13}")
    for size, by_name in rows:
        for name in ("theirs", "ours"):
            r = by_name[name]
            print(f"{size:>5} {name:<8}{r['s_per_step']:>8.2f}{r['first_step']:>14.1f}{r['wall']:>8.1f}"
                  f"{r['peak_rss'] / 1e9:>13.2f}")
        ours_, theirs_ = by_name["ours"], by_name["theirs"]
        print(f"{size:>5} {'ratio':<8}" + "".join(f"{ours_[k] / theirs_[k]:>{w}.2f}" for k, w in
                                                   (("s_per_step", 8), ("first_step", 14), ("wall", 8),
                                                    ("peak_rss", 13))))
    import torch

    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"\nfp32 matmul peak with {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s")
    for size, by_name in rows:
        flops = step_flops(size)
        achieved = flops / by_name["ours"]["s_per_step"]
        print(f"{size} px: our step is {flops / 1e9:.0f} GFLOP; {achieved / 1e9:.1f} GFLOP/s = "
              f"{achieved / peak:.0%} of the peak")


if __name__ == "__main__":
    main()
