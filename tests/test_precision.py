"""Which precision a run computes in (trainer/precision.py): bf16 on a CPU only where it has bf16
units, the refusals that say what to set instead, `auto` on CPU and GPU, and the LoRA weights and
optimizer kept in fp32 whatever the compute dtype."""

from __future__ import annotations

import pytest
import torch
from lora_lab.trainer import precision
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.precision import bf16_in_cpuinfo, resolve_precision
from lora_lab.trainer.run import train_lora

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"


@pytest.mark.parametrize(("text", "expected"), [
    (X86.format(extra="avx512_bf16"), True),
    (X86.format(extra="amx_bf16 amx_tile"), True),
    (X86.format(extra="avx512_vnni"), False),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # ARM (Graviton 3, Neoverse V1)
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
])
def test_bf16_units_are_read_from_cpuinfo(text, expected):
    assert bf16_in_cpuinfo(text) is expected


def test_a_cpu_without_bf16_units_refuses_bf16_and_fp16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(LoraLabError, match="bf16 units.*Set mixed_precision to auto or no"):
        resolve_precision("bf16", CPU)
    with pytest.raises(LoraLabError, match="fp16 is for GPUs.*Set mixed_precision to auto"):
        resolve_precision("fp16", CPU)
    assert resolve_precision("auto", CPU) == torch.float32 == resolve_precision("no", CPU)


@pytest.mark.parametrize(("speedup", "expected"), [(2.2, torch.bfloat16), (1.1, torch.float32)])
def test_auto_takes_bf16_on_a_cpu_only_where_it_measures_faster(monkeypatch, speedup, expected):
    monkeypatch.delenv(precision.AUTO_CPU_BF16, raising=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("bf16", CPU) == torch.bfloat16  # asked for, it is granted either way


def test_auto_never_times_a_cpu_without_bf16_units(monkeypatch):
    monkeypatch.delenv(precision.AUTO_CPU_BF16, raising=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("timed a CPU without bf16 units"))
    assert resolve_precision("auto", CPU) == torch.float32


def test_the_speedup_is_a_real_timing():
    assert precision.cpu_bf16_speedup() > 0


@pytest.mark.parametrize(("supported", "auto"), [(True, torch.bfloat16), (False, torch.float16)])
def test_gpus_take_bf16_where_supported_and_fp16_elsewhere(monkeypatch, supported, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", CUDA) == auto
    assert resolve_precision("fp16", CUDA) == torch.float16
    if supported:
        assert resolve_precision("bf16", CUDA) == torch.bfloat16
    else:
        with pytest.raises(LoraLabError, match="bf16 support.*Set mixed_precision to auto"):
            resolve_precision("bf16", CUDA)


def test_a_refused_precision_stops_before_the_run_starts(make_config, fresh_model, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(LoraLabError, match="bf16 units"):
        train_lora(make_config(steps=1, mixed_precision="bf16"), model=fresh_model)
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_bf16_on_a_cpu_trains_fp32_weights_and_optimizer(make_config, fresh_model, cpu_bf16):
    result = train_lora(make_config(steps=2, mixed_precision="bf16", validation_images=-1, sample_every=-1),
                        model=fresh_model)
    from lora_lab.trainer.resume import read_state, state_path

    state = read_state(state_path(result.final_path))
    assert {t.dtype for t in state.lora.values()} == {torch.float32}
    moments = [v for s in state.optimizer["state"].values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert fresh_model.denoiser.dtype == torch.float32  # a model handed in keeps its own dtype


def test_the_fp8_base_trains_under_bf16_autocast(make_config, fresh_model, cpu_bf16):
    """A Float8Linear meets fp32 inputs (norm layers stay fp32 under autocast) and bf16 ones."""
    result = train_lora(make_config(steps=2, mixed_precision="bf16", fp8_base=True, validation_images=-1,
                                    sample_every=-1), model=fresh_model)
    assert all(loss == loss for _, loss, _ in result.losses)
    from lora_lab.trainer.fp8 import Float8Linear
    from lora_lab.trainer.lora import lora_parameters

    assert any(isinstance(m, Float8Linear) for m in fresh_model.denoiser.modules())
    assert any(float(p.detach().abs().max()) > 0 for p in lora_parameters(fresh_model)[1::2])


def test_a_base_loaded_in_bf16_trains_then_samples_its_grid(make_config, cpu_bf16):
    """What the demo does where `auto` picks bf16 (a CPU with bf16 units): the base is loaded in bf16,
    and the grid after training samples in it (it once fed fp32 inputs to bf16 weights)."""
    from lora_lab.trainer.run import load_base_model
    from lora_lab.trainer.sampling import held_dtype, sample_grid

    config = make_config(steps=2, save_every=1, mixed_precision="bf16", validation_images=-1, sample_every=-1)
    model = load_base_model(config, CPU)
    assert held_dtype(model) == torch.bfloat16
    result = train_lora(config, model=model)
    rows = [(f"step {c.step}", c.path) for c in result.checkpoints]
    grid, cells = sample_grid(model, rows, ["zkw_toy"], (0.0, 1.0), (64, 64), 2, 5.0, 0)
    assert len(cells) == 4 and grid.width > 128
    assert cells[("step 2", "zkw_toy", 0.0)] != cells[("step 2", "zkw_toy", 1.0)]
