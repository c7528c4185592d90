"""`mfumon peak`, run through its own argparse registration."""

from __future__ import annotations

import argparse

import pytest
import torch

from mfumon._peaks import DTYPES, PEAKS
from mfumon.cli import peak
from tests.test_hardware import a100_with_mig, gpus

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


pytestmark = pytest.mark.usefixtures("fresh_device_state")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mfumon")
    sub = parser.add_subparsers(dest="command")
    peak.add_parser(sub)
    return parser.parse_args(["peak", *argv])


def run(capsys: pytest.CaptureFixture[str], *argv: str, nvml: object = None) -> tuple[int, str]:
    args = parse(*argv)
    assert args.func is peak.run
    code = args.func(args, nvml=nvml)
    return code, capsys.readouterr().out


def rows(out: str) -> dict[str, str]:
    """The dtype table of the output: dtype -> the rest of its line."""
    table = {}
    for line in out.splitlines():
        head, _, rest = line.partition(" ")
        if head in DTYPES:
            table[head] = rest.strip()
    return table


def test_peaks_of_a_named_device(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA H100 80GB HBM3")
    assert code == 0
    assert "device: NVIDIA H100 80GB HBM3" in out
    assert "product: NVIDIA H100 SXM5" in out
    assert "source: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet" in out
    # 1979 / 2 = 989.5 bf16, 3958 / 2 = 1979 fp8; no fp4 on Hopper
    assert rows(out) == {
        "fp64": "67",
        "fp32": "67",
        "tf32": "494.5",
        "bf16": "989.5",
        "fp16": "989.5",
        "fp8": "1979",
        "int8": "1979",
        "fp4": "-",
    }


def test_one_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA L40S", "--dtype", "float8_e4m3fn")
    assert code == 0
    assert rows(out) == {"fp8": "733"}  # 1466 / 2


def test_current_device_named_by_nvml(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device", "0", nvml=gpus("NVIDIA GeForce RTX 4090"))
    assert code == 0
    assert "device: NVIDIA GeForce RTX 4090" in out
    assert "fp32-accumulate" in out  # the consumer-part note
    assert rows(out)["bf16"] == "165.2"  # 330.4 / 2, the rate training uses


def test_mig_slice_is_scaled(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = a100_with_mig(sms=14)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    code, out = run(capsys, "--device", "0", nvml=nvml)
    assert code == 0
    assert "device: NVIDIA A100-SXM4-40GB MIG 1g.5gb" in out
    assert "share of the full device 0.130" in out  # 14 / 108 SMs
    assert rows(out)["bf16"] == "40.44"  # 312 * 14 / 108 = 40.444


def test_unknown_device_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA L4 Laptop")
    assert code == peak.EXIT_UNKNOWN_DEVICE == 1
    assert "no datasheet peak for 'NVIDIA L4 Laptop'" in out
    assert "peak_tflops=" in out and "MFUMON_PEAK_TFLOPS" in out


def test_bad_dtype_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA L4", "--dtype", "fp12")
    assert code == 2
    assert "unknown dtype 'fp12'" in out


@NO_CUDA
def test_no_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    broken = gpus()
    broken.init_error = True
    code, out = run(capsys, nvml=broken)
    assert code == 1
    assert "no GPU found (NVML failed" in out and "--device-name" in out


@NO_CUDA
def test_measure_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA H100 80GB HBM3", "--measure")
    assert code == peak.EXIT_NO_CUDA == 2
    assert "--measure needs a CUDA" in out


def test_list_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--list")
    assert code == 0
    products = {row.product for row in PEAKS.values()}
    assert all(f"{product}:" in out for product in products)
    assert "names: NVIDIA B300 SXM6 AC; NVIDIA B300" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_measure_on_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--measure", "--dtype", "bf16", "--size", "4096", "--iters", "5")
    assert code == 0
    assert "measured TFLOP/s" in out and "bf16" in rows(out)


def test_bandwidth_of_a_named_device(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--device-name", "NVIDIA A100-SXM4-80GB")
    assert code == 0
    assert "memory bandwidth: 2039 GB/s (80 GB HBM2e; https://" in out  # not the 40 GB part's 1555
    code, out = run(capsys, "--device-name", "NVIDIA GH200 120GB")
    assert "memory bandwidth: no datasheet figure for 'NVIDIA GH200 120GB'" in out


def test_mig_slice_bandwidth_is_not_guessed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = a100_with_mig(sms=14)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    code, out = run(capsys, "--device", "0", nvml=nvml)
    assert code == 0
    assert "memory bandwidth: not known for a MIG slice" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_measure_prints_copy_bandwidth(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--measure", "--dtype", "bf16", "--size", "4096", "--iters", "5")
    assert code == 0
    assert "copy bandwidth: measured" in out
