"""Benchmark the trainer on the embedded tiny model: seconds per step and peak RSS, each case in
its own process (so peak memory is that case's alone), side by side in one run.

    python scripts/benchmark_trainer.py [--steps 100] [--cases cache,no_cache,demo]

Absolute times on shared machines are noisy: compare the ratios between cases of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

CASES = {
    "cache": {"cache": True},
    "no_cache": {"cache": False},
    "grad_checkpointing": {"cache": True, "gradient_checkpointing": True},
    "text_encoder": {"cache": True, "train_text_encoder": True},
}
BASE = {"rank": 8, "learning_rate": 1e-3, "batch_size": 4, "overwrite": True}


def run_case(settings: dict) -> dict:
    """Runs inside the child process."""
    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.run import train_lora

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = train_lora(build_config({**settings, "output_dir": folder}))
        total = time.perf_counter() - started
    steps = len(result.losses)
    return {"steps": steps, "loop_s_per_step": result.seconds_per_step, "total_s": total,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cases", default="cache,no_cache,grad_checkpointing,text_encoder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    print(f"{'case':<20}{'steps':>6}{'s/step':>10}{'total s':>10}{'peak RSS MiB':>14}")
    for name in args.cases.split(","):
        settings = {**BASE, **CASES[name], "steps": args.steps, "save_every": args.steps, "name": name}
        output = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], check=True,
                                capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{name:<20}{row['steps']:>6}{row['loop_s_per_step']:>10.3f}{row['total_s']:>10.1f}"
              f"{row['peak_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
