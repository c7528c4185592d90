"""`mfumon peak`: the device's dense datasheet peaks per dtype and memory bandwidth, and with --measure
what GEMMs and a device-to-device copy reach."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mfumon._peaks import DTYPES, PEAKS, DevicePeak, lookup, lookup_bandwidth
from mfumon.devices import identify_device
from mfumon.dtypes import normalize_dtype
from mfumon.errors import ConfigError
from mfumon.hardware import ENV_PEAK_TFLOPS, TERA, measure_bandwidth, measure_peak_flops

__all__ = ["add_parser", "run"]

EXIT_OK = 0
EXIT_UNKNOWN_DEVICE = 1  # no datasheet peak for the device (or no device at all)
EXIT_NO_CUDA = 2  # --measure without a CUDA device
EXIT_USAGE = 2  # a bad argument (argparse uses 2 as well)

MEASURABLE = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")  # dtypes measure_peak_flops can time


def add_parser(subparsers: Any) -> None:
    """Register `peak` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "peak",
        help="show the device's dense peak TFLOP/s per dtype and its memory bandwidth (--measure: time them)",
        description="Print the dense (no 2:4 sparsity) datasheet peak of a device for each matmul dtype "
        "and its datasheet memory bandwidth, with the datasheets they come from. The device is the "
        "current CUDA device as NVML names it, or --device-name. --measure also times large GEMMs per "
        "dtype and a device-to-device copy.",
    )
    parser.add_argument("--device-name", help="look up this driver name instead of the current device")
    parser.add_argument("--device", type=int, default=None, help="CUDA device index (default: current)")
    parser.add_argument("--dtype", help=f"only this dtype ({', '.join(DTYPES)}, or a torch name)")
    parser.add_argument(
        "--measure", action="store_true", help="time large GEMMs per dtype and a 1 GiB copy on the device"
    )
    parser.add_argument("--size", type=int, default=8192, help="GEMM size n for --measure, n x n @ n x n")
    parser.add_argument("--iters", type=int, default=20, help="timed GEMMs per dtype for --measure")
    parser.add_argument("--list", action="store_true", help="list every device in the table and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, *, nvml: Any = None) -> int:
    """Print peaks (and measurements) for the selected device; returns the process exit code.

    `nvml` replaces the pynvml module (tests pass a stand-in).
    """
    if getattr(args, "list", False):
        _print_table()
        return EXIT_OK
    try:
        dtypes = (normalize_dtype(args.dtype),) if args.dtype else DTYPES
    except ConfigError as exc:
        print(f"mfumon peak: {exc}")
        return EXIT_USAGE
    if args.measure and not torch.cuda.is_available():
        print(
            f"mfumon peak --measure needs a CUDA (or ROCm) GPU, and this torch ({torch.__version__}) sees "
            "none; the datasheet peaks need no GPU: drop --measure"
        )
        return EXIT_NO_CUDA

    scale: float | None = 1.0  # MIG share of the full device; None when unknown
    if args.device_name:
        name, reported = args.device_name, args.device_name
    else:
        ident = identify_device(args.device if args.device is not None else _default_device(), nvml=nvml)
        if ident.name is None:
            why = f" ({ident.problem})" if ident.problem else ""
            print(
                f"no GPU found{why}; name one with --device-name, e.g. --device-name 'NVIDIA H100 80GB HBM3'"
            )
            return EXIT_UNKNOWN_DEVICE
        name, reported, scale = ident.name, ident.reported or ident.name, ident.share

    row = lookup(name)
    print(f"device: {reported}")
    if row is None:
        print(
            f"no datasheet peak for {name!r} (mfumon never guesses); pass peak_tflops=<dense TFLOP/s> "
            f"or set {ENV_PEAK_TFLOPS}, or add the device to mfumon/_peaks.py"
        )
        if not args.measure:
            return EXIT_UNKNOWN_DEVICE
    else:
        print(f"product: {row.product}")
        print(f"source: {row.source}")
        if row.note:
            print(f"note: {row.note}")
    if reported != name:
        share = "unknown" if scale is None else f"{scale:.3f}"
        print(f"MIG / partition of {name}: share of the full device {share}")
    peaks = _peaks(row, dtypes, scale)
    bandwidth = _print_bandwidth(name, reported)

    if not args.measure:
        print(f"{'dtype':<6} {'dense peak TFLOP/s':>18}")
        for dtype in dtypes:
            print(f"{dtype:<6} {_fmt(peaks[dtype]):>18}")
        return EXIT_OK if row is not None else EXIT_UNKNOWN_DEVICE

    index = args.device if args.device is not None else torch.cuda.current_device()
    print(f"measuring {args.size}x{args.size} GEMMs, {args.iters} timed per dtype, on cuda:{index}")
    print(f"{'dtype':<6} {'datasheet TFLOP/s':>18} {'measured TFLOP/s':>17} {'ratio':>6}")
    for dtype in dtypes:
        if dtype not in MEASURABLE or (row is not None and dtype not in row.tflops):
            continue
        try:
            measured = measure_peak_flops(dtype, device=index, size=args.size, iters=args.iters) / TERA
        except Exception as exc:  # e.g. fp8 on a GPU without fp8 GEMMs
            why = f"{type(exc).__name__}: {_first_line(exc)}"
            print(f"{dtype:<6} {_fmt(peaks[dtype]):>18} {'n/a':>17}   ({why})")
            continue
        peak = peaks[dtype]
        ratio = "-" if peak is None else f"{measured / peak:.2f}"
        print(f"{dtype:<6} {_fmt(peak):>18} {measured:>17.1f} {ratio:>6}")
    try:
        copied = measure_bandwidth(device=index) / 1e9
    except Exception as exc:
        print(f"copy bandwidth: n/a ({type(exc).__name__}: {_first_line(exc)})")
        return EXIT_OK
    ratio = "" if bandwidth is None else f", {copied / bandwidth:.2f} of the datasheet's {bandwidth:g}"
    print(f"copy bandwidth: measured {copied:.0f} GB/s (1 GiB device-to-device copies{ratio})")
    return EXIT_OK


def _print_bandwidth(name: str, reported: str) -> float | None:
    """Print the datasheet memory bandwidth line; its GB/s, or None (unknown, or a MIG slice)."""
    row = lookup_bandwidth(name)
    if reported != name:
        print("memory bandwidth: not known for a MIG slice / partition (its share of memory is not its SMs')")
        return None
    if row is None:
        print(f"memory bandwidth: no datasheet figure for {name!r}")
        return None
    print(f"memory bandwidth: {row.gbs:g} GB/s ({row.memory}; {row.source})")
    return row.gbs


def _default_device() -> int:
    """The current CUDA device, or index 0 (named through NVML) when this torch has no CUDA."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _peaks(row: DevicePeak | None, dtypes: tuple[str, ...], scale: float | None) -> dict[str, float | None]:
    """Dense TFLOP/s per dtype, scaled by a MIG share; None where unknown."""
    out: dict[str, float | None] = {}
    for dtype in dtypes:
        if row is None or dtype not in row.tflops or scale is None:
            out[dtype] = None
        else:
            out[dtype] = row.tflops[dtype] * scale
    return out


def _fmt(tflops: float | None) -> str:
    return "-" if tflops is None else f"{tflops:.2f}".rstrip("0").rstrip(".")  # 362.05, 989.5, 67


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:100] if text else ""


def _print_table() -> None:
    """Every row of the table: product, driver names, dense TFLOP/s per dtype."""
    seen: set[int] = set()
    for row in PEAKS.values():
        if id(row) in seen:
            continue
        seen.add(id(row))
        peaks = ", ".join(f"{d} {row.tflops[d]:g}" for d in DTYPES if d in row.tflops)
        print(f"{row.product}: {peaks}")
        print(f"    names: {'; '.join(row.names)}")
