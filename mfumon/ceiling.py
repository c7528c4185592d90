"""The measured ceiling: achieved FLOP/s of large back-to-back GEMMs on this device.

The datasheet peak (`mfumon.hardware`) is what the vendor promises; this is what torch's GEMMs
reach here, in one dtype. The monitor divides by it for `mfumon/mfu_measured`
(`measure_ceiling=True`), and it is the only MFU denominator a device with no datasheet peak (a
CPU) has. A GPU is timed with device events, the CPU with the wall clock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from mfumon.devices import cuda_index
from mfumon.dtypes import normalize_dtype
from mfumon.errors import ConfigError, check_int
from mfumon.flops import matmul_flops

__all__ = ["measure_bandwidth", "measure_peak_flops"]


def measure_peak_flops(
    dtype: str | torch.dtype,
    *,
    device: torch.device | int | str | None = None,
    size: int | None = None,
    iters: int | None = None,
    warmup: int | None = None,
) -> float:
    """Achieved FLOP/s of back-to-back (size x size) @ (size x size) GEMMs in `dtype` on one device.

    On a CUDA device (default: the current one; size 8192, 20 timed after 5 untimed) or device="cpu"
    (2048, 5 after 1: 0.5 s on 2 idle cores). ConfigError: no such device, or a dtype it cannot multiply.
    """
    canonical = normalize_dtype(dtype)
    cpu = device is not None and not isinstance(device, int) and torch.device(device).type == "cpu"
    # a 2048 GEMM is 17 GFLOP: big enough for a CPU's ceiling (1024 reached 15-25% less on 2 cores), 6 of
    # them 0.5 s at the 240 GFLOP/s 2 idle cores reach
    default_size, default_iters, default_warmup = (2048, 5, 1) if cpu else (8192, 20, 5)
    size = check_int("size", default_size if size is None else size, "rows and columns of the square GEMM")
    iters = check_int("iters", default_iters if iters is None else iters, "timed GEMMs")
    warmup = check_int("warmup", default_warmup if warmup is None else warmup, "untimed GEMMs", minimum=0)
    index = None if cpu else cuda_index(device)
    if not cpu and (index is None or not torch.cuda.is_available()):
        gpus = f"this torch sees {torch.cuda.device_count()} GPUs"
        raise ConfigError(f"measure_peak_flops needs a CUDA (or ROCm) device or device='cpu'; {gpus}")
    dev = torch.device("cpu") if cpu else torch.device("cuda", index)
    matmul = _gemm(canonical, size, dev)
    with _fp32_precision(canonical == "tf32"):
        for _ in range(warmup):
            matmul()
        seconds = _timed(matmul, iters, dev)
    return matmul_flops(size, size, size) * iters / seconds


def measure_bandwidth(
    *, device: torch.device | int | str | None = None, size_mb: int | None = None, iters: int | None = None
) -> float:
    """Achieved memory bandwidth in bytes/s: back-to-back copies of one `size_mb` MiB buffer into another.

    Each copy reads and writes the buffer: 2 x its bytes. A CUDA device (default: the current one;
    1024 MiB, 20 timed after 3 untimed) or device="cpu" (256 MiB, 5 after 1), timed as GEMMs are.
    """
    cpu = device is not None and not isinstance(device, int) and torch.device(device).type == "cpu"
    default_mb, default_iters, warmup = (256, 5, 1) if cpu else (1024, 20, 3)
    size_mb = check_int("size_mb", default_mb if size_mb is None else size_mb, "MiB copied per iteration")
    iters = check_int("iters", default_iters if iters is None else iters, "timed copies")
    index = None if cpu else cuda_index(device)
    if not cpu and (index is None or not torch.cuda.is_available()):
        gpus = f"this torch sees {torch.cuda.device_count()} GPUs"
        raise ConfigError(f"measure_bandwidth needs a CUDA (or ROCm) device or device='cpu'; {gpus}")
    dev = torch.device("cpu") if cpu else torch.device("cuda", index)
    src = torch.ones(size_mb * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    seconds = _timed(lambda: dst.copy_(src), iters, dev)
    return 2 * src.numel() * iters / seconds  # each copy reads src and writes dst


def _timed(matmul: Any, iters: int, dev: torch.device) -> float:
    """Seconds `iters` calls of `matmul` take on `dev`: device events on a GPU, the wall clock on the CPU."""
    if dev.type == "cpu":  # CPU kernels run synchronously: the call returns when the GEMM is done
        start_s = time.perf_counter()
        for _ in range(iters):
            matmul()
        return time.perf_counter() - start_s
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    stream = torch.cuda.current_stream(dev)  # `dev`'s stream, which need not be the current device's
    with torch.cuda.device(dev):  # the kernels run on `dev` too
        start.record(stream)
        for _ in range(iters):
            matmul()
        end.record(stream)
    end.synchronize()  # host sync: once, after the timed loop
    return float(start.elapsed_time(end)) / 1e3


def _gemm(dtype: str, size: int, dev: torch.device) -> Any:
    """A zero-argument callable running one (size x size) GEMM in `dtype`, output preallocated."""
    gen = torch.Generator(device=dev).manual_seed(0)
    if dtype in ("fp64", "fp32", "tf32", "bf16", "fp16"):
        torch_dtype = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
            dtype, torch.float32
        )
        a = torch.randn(size, size, device=dev, dtype=torch_dtype, generator=gen)
        b = torch.randn(size, size, device=dev, dtype=torch_dtype, generator=gen)
        out = torch.empty(size, size, device=dev, dtype=torch_dtype)
        return lambda: torch.mm(a, b, out=out)
    if dtype == "int8":
        a8 = torch.randint(-8, 8, (size, size), device=dev, dtype=torch.int8, generator=gen)
        b8 = torch.randint(-8, 8, (size, size), device=dev, dtype=torch.int8, generator=gen).t()
        return lambda: torch._int_mm(a8, b8)
    if dtype == "fp8":
        e4m3 = torch.float8_e4m3fn
        a_f8 = torch.randn(size, size, device=dev, generator=gen).to(e4m3)
        b_f8 = (
            torch.randn(size, size, device=dev, generator=gen).to(e4m3).t()
        )  # column-major, as cuBLASLt wants
        one = torch.ones((), device=dev)
        return lambda: torch._scaled_mm(a_f8, b_f8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    timeable = "fp64, fp32, tf32, bf16, fp16, fp8, int8"
    raise ConfigError(f"measure_peak_flops cannot time {dtype} GEMMs; measure one of {timeable}")


@contextlib.contextmanager
def _fp32_precision(tf32: bool) -> Iterator[None]:
    """Let fp32 matmuls use TF32 (or not) inside the block; restore the setting after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; mixing it with allow_tf32 makes torch raise
        saved = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:
        saved_allow = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = saved_allow
