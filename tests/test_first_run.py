"""A first run on a machine with no datasheet peak (a CPU) still shows the headline number: MFU
against the GEMM ceiling measured there, labelled as measured, and no warning about a package."""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, MfumonWarning
from mfumon.hardware import measure_peak_flops
from tests.conftest import TinyLM, train_step
from tests.procs import run

ROOT = Path(__file__).resolve().parents[1]
MEASURED = re.compile(r"MFU (\d+\.\d)% of measured ceiling")


def _run(mon: mfumon.Monitor, steps: int) -> None:
    torch.manual_seed(0)
    model = mon.model
    assert model is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mon:
        for _ in range(steps):
            mon.step(tokens=train_step(model, opt))


# ------------------------------------------------------------------------------------------------
# the measured ceiling on the CPU
# ------------------------------------------------------------------------------------------------


def test_cpu_ceiling_counts_2n3_flops_per_gemm() -> None:
    size, iters = 384, 8
    start = time.perf_counter()
    measured = measure_peak_flops("fp32", device="cpu", size=size, iters=iters, warmup=0)
    outer_s = time.perf_counter() - start
    # 8 GEMMs of (384 x 384) @ (384 x 384): 2 * 384**3 = 113,246,208 FLOPs each. They ran inside
    # `outer_s` (which also holds the set-up), so the rate can be no lower than this:
    assert measured >= 8 * 2 * 384**3 / outer_s
    assert math.isfinite(measured)


def test_cpu_ceiling_at_its_default_size_takes_seconds_not_minutes() -> None:
    start = time.perf_counter()
    measured = measure_peak_flops("fp32", device="cpu")  # (2048, 5 after 1): 6 x 17.2 GFLOP
    elapsed = time.perf_counter() - start
    assert measured > 0
    assert elapsed < 60  # 0.5 s on an idle 2-core machine, 3 to 5 s on a busy one


def test_ceiling_on_a_device_it_cannot_time_says_what_to_pass() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA .*device='cpu'"):
        measure_peak_flops("fp32", device="meta")


# ------------------------------------------------------------------------------------------------
# the stdout line: MFU against the measured ceiling where no datasheet peak is known
# ------------------------------------------------------------------------------------------------


def test_stdout_shows_mfu_against_the_measured_ceiling_when_no_peak_is_known(
    fresh_device_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(MfumonWarning, match=r"no datasheet MFU \(MFU against the measured GEMM ceiling"):
        mon = mfumon.Monitor(
            TinyLM(), seq_len=8, log_every=4, warmup=2, loggers="stdout", measure_ceiling=True
        )
    _run(mon, steps=8)
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    ceiling_tflops = mon.measured_peak_flops / 1e12
    assert header.startswith("[mfumon] cpu x1, no datasheet peak for cpu: MFU is against the GEMM ceiling")
    assert f"{ceiling_tflops:.3g} TFLOP/s fp32" in header
    metrics = mon.metrics
    assert K.MFU not in metrics and K.PEAK_TFLOPS not in metrics  # the datasheet key is never faked
    # mfu_measured = achieved FLOP/s per device / measured ceiling FLOP/s
    expected = metrics[K.TFLOPS_PER_DEVICE] * 1e12 / mon.measured_peak_flops
    assert metrics[K.MFU_MEASURED] == pytest.approx(expected, rel=1e-9)
    window = next(line for line in out.splitlines() if line.startswith("[mfumon] step 8 |"))
    assert f"| MFU {expected * 100:.1f}% of measured ceiling |" in window
    assert "MFU vs measured" not in out  # the measured figure is the headline, shown once per line
    summary = next(line for line in out.splitlines() if "(run summary)" in line)
    whole_run = mon.summary()
    assert K.MFU not in whole_run
    assert f"MFU {whole_run[K.MFU_MEASURED] * 100:.1f}% of measured ceiling" in summary


def test_no_measured_headline_when_a_peak_is_known(
    fresh_device_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # A peak of 0.5 TFLOP/s given for the CPU: MFU divides by it; the measured figure is the extra.
    mon = mfumon.Monitor(
        TinyLM(), seq_len=8, log_every=4, warmup=2, loggers="stdout", measure_ceiling=True, peak_tflops=0.5
    )
    _run(mon, steps=8)
    out = capsys.readouterr().out
    assert MEASURED.search(out) is None
    assert "no datasheet peak" not in out
    assert out.splitlines()[0].startswith("[mfumon] cpu x1, peak 0.5 TFLOP/s fp32, measured GEMM ceiling ")
    metrics = mon.metrics
    window = next(line for line in out.splitlines() if line.startswith("[mfumon] step 8 |"))
    assert f"| MFU {metrics[K.MFU] * 100:.1f}% |" in window
    assert f"MFU vs measured {metrics[K.MFU_MEASURED] * 100:.1f}%" in window


def test_no_measured_figure_without_measure_ceiling(
    fresh_device_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(MfumonWarning, match="so no peak and no MFU;"):
        mon = mfumon.Monitor(TinyLM(), seq_len=8, log_every=4, warmup=2, loggers="stdout")
    _run(mon, steps=8)
    out = capsys.readouterr().out
    assert mon.measured_peak_flops is None
    assert "measured" not in out and "MFU" not in out
    assert "no peak known (pass peak_tflops=)" in out.splitlines()[0]


# ------------------------------------------------------------------------------------------------
# the README's example, as a new user runs it
# ------------------------------------------------------------------------------------------------


def test_numpy_is_a_dependency() -> None:
    # torch's wheel lists no numpy, yet `import torch` warns "Failed to initialize NumPy" without it
    # (torch 2.13, a fresh venv): every mfumon user imports torch, so mfumon depends on numpy.
    project = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
    deps = re.search(r"^dependencies = \[(.*?)^\]", project, flags=re.S | re.M)
    assert deps is not None and re.search(r'^\s*"numpy[>=<~ ]', deps.group(1), flags=re.M)


@pytest.mark.slow
def test_the_example_on_a_cpu_shows_mfu_against_the_measured_ceiling(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    script = ROOT / "examples" / "train_tiny_gpt.py"
    args = ["--steps", "12", "--log-every", "6", "--seq-len", "32", "--batch-size", "4", "--run-name", "t"]
    proc = run([sys.executable, str(script), *args], cwd=tmp_path, env=env, check=True)
    out = proc.stdout
    assert "no datasheet peak for cpu: MFU is against the GEMM ceiling measured here" in out
    windows = [line for line in out.splitlines() if line.startswith("[mfumon] step 12")]
    assert windows and all(MEASURED.search(line) for line in windows), out
    assert "NumPy" not in out + proc.stderr
    assert (tmp_path / "runs" / "t.jsonl").is_file()


def test_the_ceiling_waits_for_the_dtype_the_first_forward_shows() -> None:
    # Without dtype=, the matmul dtype is known at the first forward (autocast); a ceiling timed at
    # start() would be the fp32 one and MFU against it far too high under bf16 autocast.
    model = torch.nn.Linear(64, 64)
    with pytest.warns(MfumonWarning, match="measured GEMM ceiling instead"):
        mon = mfumon.Monitor(model, seq_len=8, loggers=(), measure_ceiling=True, self_check=False)
    mon.start()
    assert mon.measured_peak_flops is None and mon.peak.dtype == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(8, 64)).float().sum().backward()
    assert mon.peak.dtype == "bf16" and mon.measured_peak_flops is not None and mon.measured_peak_flops > 0
    mon.step(tokens=8)
    mon.close()
