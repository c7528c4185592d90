"""Device naming through NVML, MIG shares, overrides, dtype detection; only NVML is a stand-in."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mfumon import hardware
from mfumon.devices import device_name, identify_device
from mfumon.dtypes import matmul_dtype, normalize_dtype
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning
from mfumon.hardware import (
    PeakInfo,
    measure_bandwidth,
    measure_peak_flops,
    memory_bandwidth,
    peak_flops,
    peak_override_flops,
    resolve_peak,
)
from tests.nvml_fake import a100_with_mig, gpus  # the one stand-in: NVML

T = 1e12
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


pytestmark = pytest.mark.usefixtures("fresh_device_state")


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (torch.float64, "fp64"),
        (torch.float32, "fp32"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
        (torch.float8_e4m3fn, "fp8"),
        (torch.float8_e5m2, "fp8"),
        (torch.int8, "int8"),
        ("bf16", "bf16"),
        ("BFloat16", "bf16"),
        ("torch.bfloat16", "bf16"),
        ("bf16-mixed", "bf16"),  # Lightning precision flags
        ("16-mixed", "fp16"),
        ("32-true", "fp32"),
        ("half", "fp16"),
        ("tf32", "tf32"),
        ("e4m3", "fp8"),
        ("nvfp4", "fp4"),
    ],
)
def test_normalize_dtype(given: str | torch.dtype, canonical: str) -> None:
    assert normalize_dtype(given) == canonical


def test_unknown_dtype_lists_the_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown dtype 'bfloat15'.*fp64, fp32, tf32, bf16, fp16, fp8, int8, fp4"
    ):
        normalize_dtype("bfloat15")
    with pytest.raises(ConfigError, match="complex64"):
        normalize_dtype(torch.complex64)
    with pytest.raises(ConfigTypeError, match="dtype must be a str or torch.dtype"):
        normalize_dtype(16)  # type: ignore[arg-type]


@pytest.fixture
def fp32_precision() -> Iterator[None]:
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def test_matmul_dtype_from_parameters(fp32_precision: None) -> None:
    torch.set_float32_matmul_precision("highest")
    assert matmul_dtype(nn.Linear(8, 8)) == "fp32"
    assert matmul_dtype(nn.Linear(8, 8).to(torch.bfloat16)) == "bf16"
    assert matmul_dtype(nn.Linear(8, 8).half()) == "fp16"
    # the dtype holding most parameter elements wins: 64*64 bf16 weights vs 2*2 fp32
    mixed = nn.Sequential(nn.Linear(64, 64, bias=False).to(torch.bfloat16), nn.Linear(2, 2, bias=False))
    assert matmul_dtype(mixed) == "bf16"
    assert matmul_dtype(None) == "fp32"
    assert matmul_dtype(nn.ReLU()) == "fp32"  # no parameters


def test_matmul_dtype_tf32_follows_fp32_matmul_precision(fp32_precision: None) -> None:
    torch.set_float32_matmul_precision("high")
    assert matmul_dtype(nn.Linear(8, 8)) == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert matmul_dtype(nn.Linear(8, 8)) == "tf32"
    assert matmul_dtype(nn.Linear(8, 8).to(torch.bfloat16)) == "bf16"  # only fp32 matmuls become tf32
    torch.set_float32_matmul_precision("highest")
    assert matmul_dtype(nn.Linear(8, 8)) == "fp32"


def test_matmul_dtype_autocast_and_override(fp32_precision: None) -> None:
    torch.set_float32_matmul_precision("highest")
    model = nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(model) == "bf16"  # active autocast beats the fp32 parameters
    assert matmul_dtype(model, autocast_dtype=torch.float16) == "fp16"
    assert matmul_dtype(model, autocast_dtype="fp8") == "fp8"
    with pytest.raises(ConfigError, match="unknown dtype"):
        matmul_dtype(model, autocast_dtype="fp12")


# --------------------------------------------------------------------------------------------
# naming the device through NVML
# --------------------------------------------------------------------------------------------


def test_device_name_through_nvml() -> None:
    nvml = gpus("NVIDIA H100 80GB HBM3", "NVIDIA L40S")
    assert device_name(0, nvml=nvml) == "NVIDIA H100 80GB HBM3"
    assert device_name(torch.device("cuda", 1), nvml=nvml) == "NVIDIA L40S"
    assert device_name("cuda:1", nvml=nvml) == "NVIDIA L40S"
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 3


def test_older_bindings_return_bytes() -> None:
    nvml = gpus("Tesla V100-SXM2-16GB")
    nvml.bytes_names = True
    assert device_name(0, nvml=nvml) == "Tesla V100-SXM2-16GB"
    assert peak_flops(dtype="fp16", device=0, nvml=nvml) == 125 * T


def test_cuda_visible_devices_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = gpus("NVIDIA A10", "NVIDIA A100-SXM4-80GB", "NVIDIA A10G", "NVIDIA L4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert device_name(0, nvml=nvml) == "NVIDIA L4"  # cuda:0 is physical GPU 3
    assert device_name(1, nvml=nvml) == "NVIDIA A100-SXM4-80GB"
    assert device_name(2, nvml=nvml) is None  # not visible: no name, no exception


def test_cuda_visible_devices_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = gpus("NVIDIA A10", "NVIDIA B200")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.gpus[1].uuid)
    assert device_name(0, nvml=nvml) == "NVIDIA B200"
    assert peak_flops(dtype="bf16", device=0, nvml=nvml) == 4500 / 2 * T


@NO_CUDA
def test_cpu_devices_have_no_name() -> None:
    nvml = gpus("NVIDIA H100 80GB HBM3")
    assert device_name(None, nvml=nvml) is None  # the current device of a CPU torch is the CPU
    assert device_name(torch.device("cpu"), nvml=nvml) is None
    assert device_name("meta", nvml=nvml) is None
    assert peak_flops(dtype="bf16", device="cpu", nvml=nvml) is None
    assert nvml.calls == []  # NVML is not even asked


@pytest.mark.parametrize(
    ("driver_name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 1979 / 2),
        ("NVIDIA H200", "bf16", 1979 / 2),
        ("NVIDIA H20", "bf16", 148),
        ("NVIDIA L4", "fp8", 485 / 2),
        ("NVIDIA L40", "fp8", 724 / 2),
        ("NVIDIA L40S", "fp8", 1466 / 2),
        ("NVIDIA A10", "bf16", 250 / 2),
        ("NVIDIA A10G", "bf16", 70),
        ("NVIDIA A100 80GB PCIe", "tf32", 312 / 2),
        ("NVIDIA GeForce RTX 4090", "bf16", 330.4 / 2),
        ("NVIDIA GB200", "fp4", 20000 / 2),
    ],
)
def test_current_device_peak_from_nvml(driver_name: str, dtype: str, tflops: float) -> None:
    assert peak_flops(dtype=dtype, device=0, nvml=gpus(driver_name)) == pytest.approx(tflops * T, rel=1e-12)


# --------------------------------------------------------------------------------------------
# MIG
# --------------------------------------------------------------------------------------------


def test_mig_slice_gets_its_sm_share(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = a100_with_mig(sms=14)  # A100 MIG 1g.5gb: 14 of the A100's 108 SMs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    ident = identify_device(0, nvml=nvml)
    assert ident.mig and ident.sm_count == 14
    assert ident.name == "NVIDIA A100-SXM4-40GB"  # looked up as its parent GPU ...
    assert ident.reported == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"  # ... shown under its own name
    assert ident.share == pytest.approx(14 / 108)
    assert device_name(0, nvml=nvml) == "NVIDIA A100-SXM4-40GB"
    assert peak_flops(dtype="bf16", device=0, nvml=nvml) == pytest.approx(312 * T * 14 / 108)

    info = resolve_peak(peak_tflops=None, dtype="bf16", device=0, nvml=nvml)
    assert info.device == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    assert info.scale == pytest.approx(14 / 108)
    assert info.flops == pytest.approx(312 * T * 14 / 108)


def test_mig_name_is_never_looked_up_as_the_full_gpu() -> None:
    assert peak_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "bf16") is None


def test_mig_on_a_gpu_with_unknown_sm_count_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = a100_with_mig(sms=20, parent="NVIDIA GB300")  # GB300's full SM count is not in the table
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    assert peak_flops(dtype="bf16", device=0, nvml=nvml) is None
    with pytest.warns(MfumonWarning, match=r"MIG device 'NVIDIA GB300 MIG 1g.5gb' \(on 'NVIDIA GB300'\)"):
        info = resolve_peak(peak_tflops=None, dtype="bf16", device=0, nvml=nvml)
    assert info.flops is None


# --------------------------------------------------------------------------------------------
# resolve_peak: override > environment > table; refuse to guess; never raise for NVML
# --------------------------------------------------------------------------------------------


def test_resolve_peak_from_the_table() -> None:
    info = resolve_peak(peak_tflops=None, dtype=torch.bfloat16, device=0, nvml=gpus("NVIDIA H100 80GB HBM3"))
    assert info == PeakInfo(
        device="NVIDIA H100 80GB HBM3",
        dtype="bf16",
        flops=1979 / 2 * T,
        source="https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
        scale=1.0,
        product="NVIDIA H100 SXM5",
    )
    assert info.tflops == 989.5


def test_explicit_peak_beats_environment_beats_table(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = gpus("NVIDIA H100 80GB HBM3")
    monkeypatch.setenv(hardware.ENV_PEAK_TFLOPS, "800")
    env = resolve_peak(peak_tflops=None, dtype="bf16", device=0, nvml=nvml)
    assert (env.flops, env.source, env.device) == (800 * T, "MFUMON_PEAK_TFLOPS", "NVIDIA H100 80GB HBM3")
    explicit = resolve_peak(peak_tflops=700.5, dtype="bf16", device=0, nvml=nvml)
    assert (explicit.flops, explicit.source) == (700.5 * T, "peak_tflops argument")


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "989", True])
def test_bad_peak_tflops_fails_at_once(bad: object) -> None:
    with pytest.raises(ConfigError, match="peak_tflops must be a positive number of TFLOP/s"):
        resolve_peak(peak_tflops=bad, dtype="bf16", device="cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["abc", "0", "-5", "nan"])
def test_bad_environment_peak_fails_at_once(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(hardware.ENV_PEAK_TFLOPS, bad)
    with pytest.raises(ConfigError, match="environment variable MFUMON_PEAK_TFLOPS"):
        peak_override_flops(None)
    assert peak_override_flops(100) == (100 * T, "peak_tflops argument")  # the argument still wins


def test_bad_dtype_fails_before_nvml_is_asked() -> None:
    nvml = gpus("NVIDIA H100 80GB HBM3")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_peak(peak_tflops=None, dtype="fp13", device=0, nvml=nvml)
    assert nvml.calls == []


def test_unknown_device_warns_once_with_the_name_and_the_fix() -> None:
    nvml = gpus("NVIDIA H100")  # a real driver string of an H100 variant the table does not know
    with pytest.warns(MfumonWarning) as record:
        info = resolve_peak(peak_tflops=None, dtype="bf16", device=0, nvml=nvml)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'NVIDIA H100'" in message and "peak_tflops=" in message and "MFUMON_PEAK_TFLOPS" in message
    assert record[0].filename == __file__  # points at the caller, not at mfumon
    assert info.flops is None and info.device == "NVIDIA H100"


def test_dtype_the_device_lacks_warns_and_gives_no_peak() -> None:
    with pytest.warns(MfumonWarning, match="NVIDIA A100 has no published fp8 peak"):
        info = resolve_peak(peak_tflops=None, dtype="fp8", device=0, nvml=gpus("NVIDIA A100-SXM4-80GB"))
    assert info.flops is None


def test_tf32_on_a_part_without_tf32_runs_fp32() -> None:
    info = resolve_peak(peak_tflops=None, dtype="tf32", device=0, nvml=gpus("Tesla V100-SXM2-32GB"))
    assert (info.dtype, info.flops) == ("fp32", 15.7 * T)  # Volta ignores allow_tf32


def test_cpu_device_warns_and_gives_no_peak() -> None:
    with pytest.warns(MfumonWarning, match="'cpu'.*not a GPU.*peak_tflops="):
        info = resolve_peak(peak_tflops=None, dtype="fp32", device="cpu")
    assert info == PeakInfo(device=None, dtype="fp32", flops=None, source="")


def test_nvml_init_failure_is_logged_once_and_the_override_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = gpus("NVIDIA H100 80GB HBM3")
    broken.init_error = True
    with caplog.at_level(logging.WARNING, logger="mfumon"):
        info = resolve_peak(peak_tflops=400, dtype="bf16", device=0, nvml=broken)
        again = resolve_peak(peak_tflops=400, dtype="bf16", device=0, nvml=broken)
    assert info.flops == again.flops == 400 * T
    records = [r for r in caplog.records if r.name == "mfumon"]
    assert len(records) == 1 and "NVML could not name CUDA device 0" in records[0].getMessage()


@NO_CUDA
def test_nvml_failure_without_override_refuses(caplog: pytest.LogCaptureFixture) -> None:
    broken = gpus("NVIDIA H100 80GB HBM3")
    broken.name_error = True  # fails mid-run, after init
    with caplog.at_level(logging.WARNING, logger="mfumon"):
        with pytest.warns(MfumonWarning, match=r"could not name device 0: NVML failed.*GPU is lost"):
            info = resolve_peak(peak_tflops=None, dtype="bf16", device=0, nvml=broken)
        assert peak_flops(dtype="bf16", device=0, nvml=broken) is None
    assert info.flops is None
    assert len([r for r in caplog.records if r.name == "mfumon"]) == 1
    assert broken.calls.count("init") == broken.calls.count("shutdown")


# --------------------------------------------------------------------------------------------
# measured ceiling
# --------------------------------------------------------------------------------------------


@NO_CUDA
def test_measure_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA"):
        measure_peak_flops("bf16")


def test_measure_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="size must be an int >= 1"):
        measure_peak_flops("bf16", size=0)
    with pytest.raises(ConfigError, match="iters must be an int >= 1"):
        measure_peak_flops("bf16", iters=0)
    with pytest.raises(ConfigError, match="warmup must be an int >= 0"):
        measure_peak_flops("bf16", warmup=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_measured_bf16_gemm_is_below_the_datasheet() -> None:
    measured = measure_peak_flops("bf16", size=4096, iters=10)
    assert measured > 0
    peak = peak_flops(dtype="bf16")
    if peak is not None:
        assert measured < 1.05 * peak  # a GEMM cannot beat the datasheet (5% for boost clocks)


# --------------------------------------------------------------------------------------------
# memory bandwidth: datasheet per device, and the measured copy
# --------------------------------------------------------------------------------------------


def test_current_device_bandwidth_from_nvml() -> None:
    assert memory_bandwidth(device=0, nvml=gpus("NVIDIA H100 80GB HBM3")) == pytest.approx(3.35e12)
    assert memory_bandwidth(device=0, nvml=gpus("NVIDIA A100-SXM4-40GB")) == pytest.approx(1.555e12)


def test_mig_slice_has_no_datasheet_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = a100_with_mig(sms=14)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    assert memory_bandwidth(device=0, nvml=nvml) is None  # its memory share is not its SM share


def test_measured_cpu_copy_bandwidth() -> None:
    # 16 MiB copied 3 times: 2 x 16 MiB moved per copy; a CPU moves between 0.1 and 1000 GB/s
    measured = measure_bandwidth(device="cpu", size_mb=16, iters=3)
    assert 1e8 < measured < 1e12
    with pytest.raises(ConfigError, match="size_mb must be an int >= 1"):
        measure_bandwidth(device="cpu", size_mb=0)


@NO_CUDA
def test_measure_bandwidth_needs_a_device() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA"):
        measure_bandwidth()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_measured_copy_is_below_the_datasheet() -> None:
    measured = measure_bandwidth(size_mb=512, iters=5)
    datasheet = memory_bandwidth()
    assert measured > 0 and (datasheet is None or measured < 1.05 * datasheet)
