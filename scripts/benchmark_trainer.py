"""Benchmark the trainer per family and option: seconds per step, the base model's resident size,
the loop's peak memory above what was resident when it started, and the trainer's memory estimate
of that same quantity. Each case runs in its own process, side by side in one run. Models are
random, built from configs (tests/tiny_models.py); sd15 at "tiny" size is the shipped demo model.

    python scripts/benchmark_trainer.py [--steps 20] [--families sd15,sdxl,flux] [--sizes tiny,reduced]
                                        [--cases plain,no_cache,checkpointing,text_encoder,fp8_base]

Absolute times on shared machines are noisy: compare the ratios between cases of one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"plain": {}, "no_cache": {"cache": False}, "checkpointing": {"gradient_checkpointing": True},
         "text_encoder": {"train_text_encoder": True}, "fp8_base": {"fp8_base": True}}
NOT_FOR = {"text_encoder": {"flux"}}  # FLUX LoRAs train the transformer only
RESOLUTION = {"tiny": 64, "reduced": 128}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_case(settings: dict) -> dict:
    """Runs inside the child process: measures around the training loop only."""
    from lora_lab.trainer import budget, run
    from lora_lab.trainer.config import build_config

    measured: dict = {}
    original_loop, original_check = run.run_loop, budget.check_memory

    def check(*args, **kwargs):
        estimate = original_check(*args, **kwargs)
        measured["estimate"], measured["base"] = estimate.training, estimate.base
        return estimate

    def loop(*args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
        start = _status("VmRSS")
        result = original_loop(*args, **kwargs)
        measured["peak_extra"] = _status("VmHWM") - start
        return result

    run.run_loop, run.check_memory = loop, check
    with tempfile.TemporaryDirectory() as folder:
        result = run.train_lora(build_config({**settings, "output_dir": folder}))
    return {"s_per_step": result.seconds_per_step, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", default="sd15,sdxl,flux")
    parser.add_argument("--sizes", default="tiny,reduced")
    parser.add_argument("--cases", default="plain,checkpointing,fp8_base")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import build

    print(f"{'family':<7}{'size':<9}{'case':<15}{'s/step':>8}{'base MiB':>10}{'peak MiB':>10}{'estimate MiB':>14}"
          f"{'ratio':>7}")
    with tempfile.TemporaryDirectory() as models:
        for family in args.families.split(","):
            for size in args.sizes.split(","):
                folder = build(family, Path(models) / f"{family}-{size}", size)
                for case in args.cases.split(","):
                    if family in NOT_FOR.get(case, ()):
                        continue
                    settings = {"family": family, "base_model": str(folder), "steps": args.steps, "rank": 16,
                                "batch_size": 2, "resolution": RESOLUTION[size], "save_every": args.steps,
                                "name": case, **CASES[case]}
                    output = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], check=True,
                                            capture_output=True, text=True).stdout
                    row = json.loads(output.strip().splitlines()[-1])
                    peak, estimate = row["peak_extra"] / 2**20, row["estimate"] / 2**20
                    print(f"{family:<7}{size:<9}{case:<15}{row['s_per_step']:>8.3f}{row['base'] / 2**20:>10.1f}"
                          f"{peak:>10.1f}{estimate:>14.1f}{estimate / max(peak, 0.1):>7.2f}")


if __name__ == "__main__":
    main()
