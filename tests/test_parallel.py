"""Data-parallel training through Accelerate (torch DDP, gloo on the CPU): two processes train as
one process with the same global batch, only the main process writes, and resume works.

Two processes with batch 1 see the same micro-batches and noise as one process with batch 1 and
gradient accumulation 2 (see trainer/parallel.py), so the losses and the LoRA must agree up to
the order of float additions: the tolerance is 1e-4 relative on the loss and 1e-3 absolute on the
fp16 weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lora_lab.trainer.history import read_loss_log
from safetensors.torch import load_file

SETTINGS = ["--steps", "4", "--save-every", "2", "--batch-size", "1", "--rank", "4", "--learning-rate", "1e-3",
            "--validation-images", "-1", "--no-samples", "--overwrite", "true"]


def train(output, name: str, processes: int, *extra: str) -> None:
    command = ["-m", "lora_lab", "train", *SETTINGS, "--output-dir", str(output), "--name", name, *extra]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29533",
                   *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    train(tmp_path, "two", 2)
    train(tmp_path, "one", 1, "--gradient-accumulation", "2")
    two, one = tmp_path / "two", tmp_path / "one"
    assert sorted(p.name for p in two.glob("*.safetensors")) == ["two-step000002.safetensors", "two.safetensors"]
    assert not list(two.glob(".*.tmp"))  # the second process wrote nothing, not even half a file
    two_losses = [loss for _, loss, _ in read_loss_log(two / "two-loss.csv")]
    one_losses = [loss for _, loss, _ in read_loss_log(one / "one-loss.csv")]
    print("loss per step, 2 processes:", [f"{x:.6f}" for x in two_losses])
    print("loss per step, 1 process, accumulation 2:", [f"{x:.6f}" for x in one_losses])
    assert len(two_losses) == 4 and two_losses == pytest.approx(one_losses, rel=1e-4)
    two_lora, one_lora = load_file(two / "two.safetensors"), load_file(one / "one.safetensors")
    assert two_lora.keys() == one_lora.keys()
    difference = max((two_lora[k].float() - one_lora[k].float()).abs().max().item() for k in two_lora)
    print(f"largest difference between the two LoRAs: {difference:.2e}")
    assert difference < 1e-3
    first_step = load_file(two / "two-step000002.safetensors")
    assert max((first_step[k].float() - two_lora[k].float()).abs().max().item() for k in two_lora) > 1e-3  # it trained

    # Resumed in two processes from its step-2 checkpoint, the run ends where it ended before.
    final = two_lora
    train(tmp_path, "two", 2, "--resume", str(two / "two-step000002.safetensors"))
    resumed = load_file(two / "two.safetensors")
    assert max((resumed[k].float() - final[k].float()).abs().max().item() for k in final) < 1e-3
