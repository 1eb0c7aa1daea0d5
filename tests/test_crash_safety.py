"""Crash safety: a training process killed (SIGKILL) while it writes a checkpoint leaves only
complete files, and the run resumes from them. LORA_LAB_KILLS sets how many kills (default 8)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from lora_lab.trainer.resume import read_state
from safetensors.torch import load_file


def _saving(run_dir) -> bool:
    """Whether a checkpoint save is in progress (its temporary file exists; the loss log's own
    writes do not count). A fresh run may be deleting and re-creating the folder at this moment
    (the demo overwrites), so a vanished folder means no."""
    try:
        return any(name.endswith(".tmp") and (".safetensors." in name or ".resume." in name)
                   for name in os.listdir(run_dir))
    except FileNotFoundError:
        return False


def _check_every_file(run_dir) -> None:
    for path in run_dir.iterdir():
        if path.name.endswith(".tmp"):
            continue  # a half-written temporary: never read, removed by the next run
        if path.suffix == ".safetensors":
            assert load_file(str(path)), path
        elif path.suffix == ".resume":
            assert read_state(path).step > 0, path


def test_sigkill_while_saving_leaves_complete_files_and_the_run_resumes(tmp_path):
    kills = int(os.environ.get("LORA_LAB_KILLS", "8"))
    # Each run is killed within its first few saves (one per step), so with this many steps no run
    # can reach the end before the last kill; a finished run would make the next --resume refuse.
    steps = 10 * kills
    run_dir = tmp_path / "zkw_toy"
    command = [sys.executable, "-m", "lora_lab", "demo", "--steps", str(steps), "--save-every", "1", "--no-samples",
               "--output-dir", str(tmp_path), "--rank", "16",
               "--validation-images", "-1"]  # a validation pass at each of 80 saves would only add minutes
    chance = random.Random(1)
    killed_while_saving = 0
    for _ in range(kills):
        resume = ["--resume", "latest"] if any(run_dir.glob("*.resume")) else []
        log = tmp_path / "run.log"
        with log.open("w") as output:
            process = subprocess.Popen(command + resume, stdout=output, stderr=subprocess.STDOUT)
        deadline, saves_to_skip = time.time() + 120, chance.randint(0, 4)
        while process.poll() is None and time.time() < deadline:
            # Catch a save in progress, then strike a moment later.
            if _saving(run_dir):
                if saves_to_skip == 0:
                    time.sleep(chance.uniform(0, 0.004))
                    process.send_signal(signal.SIGKILL)
                    killed_while_saving += 1
                    break
                saves_to_skip -= 1
                while _saving(run_dir) and process.poll() is None:
                    time.sleep(0.0005)
        process.wait(timeout=60)
        assert process.returncode in (-signal.SIGKILL, 0), log.read_text()[-3000:]
        _check_every_file(run_dir)
    print(f"{killed_while_saving} of {kills} kills landed while a file was being written")
    assert killed_while_saving >= kills // 2
    finish = subprocess.run(command + ["--resume", "latest"], capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0 or "nothing left to train" in finish.stderr, finish.stderr
    _check_every_file(run_dir)
    assert read_state(run_dir / "zkw_toy.resume").step == steps
    assert not list(run_dir.glob(".*.tmp"))  # the last run cleared what the killed ones left
