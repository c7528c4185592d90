"""Check device peaks on a real GPU: NVML's name, the table's peaks, and what GEMMs reach.

Run on the GPU machine (not a test; pytest does not collect it):

    python benchmarks/gpu_peak_check.py [--size 8192] [--iters 30] [--device 0]

Prints one JSON object to stdout: the raw NVML and torch names, the identity mfumon derives
(MIG share included), the datasheet peak per dtype, the measured GEMM TFLOP/s per dtype and
their ratio, and what resolve_peak gives for the detected matmul dtype. Every step is
guarded, so a failure shows up as an "error" field instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from typing import Any

import torch

from mfumon._peaks import DTYPES, lookup
from mfumon.devices import identify_device
from mfumon.dtypes import matmul_dtype
from mfumon.hardware import TERA, measure_peak_flops, resolve_peak

MEASURABLE = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")


def _nvml_facts(index: int) -> dict[str, Any]:
    """What NVML itself says, without mfumon in between."""
    try:
        import pynvml  # type: ignore[import-untyped]

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            facts: dict[str, Any] = {
                "name": name.decode() if isinstance(name, bytes) else name,
                "name_is_bytes": isinstance(name, bytes),
                "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "device_count": pynvml.nvmlDeviceGetCount(),
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            }
            try:
                current, pending = pynvml.nvmlDeviceGetMigMode(handle)
                facts["mig_mode"] = [current, pending]
            except Exception as exc:
                facts["mig_mode"] = f"n/a ({type(exc).__name__})"
            return facts
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return {"error": repr(exc)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_facts(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "uuid": str(getattr(props, "uuid", "")),
        "multi_processor_count": props.multi_processor_count,
        "capability": list(torch.cuda.get_device_capability(index)),
        "total_memory_gib": round(props.total_memory / 2**30, 2),
    }


def _measure(
    index: int, dtypes: tuple[str, ...], size: int, iters: int, peaks: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in dtypes:
        start = time.perf_counter()
        try:
            measured = measure_peak_flops(dtype, device=index, size=size, iters=iters) / TERA
        except Exception as exc:
            out[dtype] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
            continue
        peak = peaks.get(dtype)
        out[dtype] = {
            "measured_tflops": round(measured, 1),
            "datasheet_tflops": peak,
            "ratio": None if peak is None else round(measured / peak, 3),
            "wall_s": round(time.perf_counter() - start, 2),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "cuda_available": torch.cuda.is_available(),
    }
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device visible to torch"
        print(json.dumps(report, indent=2))
        return 2
    index = args.device
    torch.cuda.set_device(index)
    report["nvml"] = _nvml_facts(index)
    report["torch_device"] = _torch_facts(index)

    ident = identify_device(index)
    report["identity"] = {
        "name": ident.name,
        "reported": ident.reported,
        "share": ident.share,
        "mig": ident.mig,
        "sm_count": ident.sm_count,
        "problem": ident.problem,
    }
    row = lookup(ident.name) if ident.name else None
    report["table_row"] = (
        None if row is None else {"product": row.product, "source": row.source, "note": row.note}
    )
    scale = ident.share or 0.0
    peaks = {
        d: (None if row is None or d not in row.tflops else round(row.tflops[d] * scale, 3)) for d in DTYPES
    }
    report["peak_tflops"] = peaks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = resolve_peak(peak_tflops=None, dtype=matmul_dtype(None, autocast_dtype="bf16"), device=index)
    report["resolve_peak_bf16"] = {
        "device": info.device,
        "dtype": info.dtype,
        "tflops": info.tflops,
        "source": info.source,
        "scale": info.scale,
        "warnings": [str(w.message) for w in caught],
    }

    report["gemm"] = {"size": args.size, "iters": args.iters}
    report["measured"] = _measure(index, MEASURABLE, args.size, args.iters, peaks)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
