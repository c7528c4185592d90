"""Dense datasheet peaks per device and matmul dtype: data, not logic.

One row per product. Each row is keyed by the exact names the driver reports (NVML's
``nvmlDeviceGetName`` on NVIDIA, ``torch.cuda.get_device_name`` on ROCm); aliases are extra
keys pointing at the same row. Lookup is a dictionary get after whitespace and case
normalization: never a substring test, never a fallback device.

Rules for the numbers (TFLOP/s, or TOP/s for int8):
- dense: where a datasheet prints "with sparsity" (2:4 structured sparsity) we halve it;
- matmul rate: fp64 and fp32 use the Tensor/Matrix Core rate where the part has one;
- consumer GeForce parts: fp16/bf16/fp8 at the FP32-accumulate rate, the rate training uses
  (their datasheets headline the FP16-accumulate rate, twice as fast);
- a dtype a part has no published rate for is absent, so its peak is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "BANDWIDTH",
    "DTYPES",
    "PEAKS",
    "DevicePeak",
    "MemoryBandwidth",
    "lookup",
    "lookup_bandwidth",
    "normalize_name",
]

# canonical matmul dtype names, widest first
DTYPES: tuple[str, ...] = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")


@dataclass(frozen=True)
class DevicePeak:
    """One product's dense peaks in TFLOP/s by matmul dtype, with the datasheet they come from."""

    product: str  # marketing name, for people
    tflops: Mapping[str, float]  # dense TFLOP/s (TOP/s for int8) per canonical dtype
    source: str  # datasheet or whitepaper URL the numbers come from
    sm_count: int | None = None  # SMs (AMD: CUs) of one full device, to scale MIG / partitions
    note: str = ""  # anything a reader must know about the row
    names: tuple[str, ...] = field(default=(), compare=False)  # every driver name of this row

    def __post_init__(self) -> None:
        unknown = set(self.tflops) - set(DTYPES)
        if unknown:
            raise ValueError(f"{self.product}: unknown dtype(s) {sorted(unknown)}; use {DTYPES}")
        object.__setattr__(self, "tflops", MappingProxyType(dict(self.tflops)))


def normalize_name(name: str) -> str:
    """The lookup key of a driver name: whitespace collapsed, case folded (still an exact match)."""
    return " ".join(name.split()).casefold()


def _sparse(tflops: float) -> float:
    return tflops / 2  # datasheet "with sparsity" figure -> dense (2:4 structured sparsity doubles it)


# ---------------------------------------------------------------------------------------------
# The table: (driver names, DevicePeak). Names are the product names the NVIDIA driver reports
# (its "supported GPUs" list, e.g. NVIDIA/open-gpu-kernel-modules README, and nvidia-smi output
# in bug reports); on ROCm, the marketing name torch reports. In the comments, "a | b*" is the
# datasheet's dense | with-sparsity pair and "b*" alone a figure printed only with sparsity.
# ---------------------------------------------------------------------------------------------

_V100 = (
    "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
)
_T4 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"
_A10 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf"
_A10G = "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/"
_A30 = "https://www.nvidia.com/content/dam/en-zz/Solutions/data-center/products/a30-gpu/pdf/a30-datasheet.pdf"
_A40 = "https://images.nvidia.com/content/Solutions/data-center/a40/nvidia-a40-datasheet.pdf"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_A800 = "NVIDIA A800 Tensor Core GPU datasheet (A800 SXM4 / PCIe 80GB)"
_GA102 = "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
_L4 = "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
_L40 = "https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf"
_L40S = "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H800 = "NVIDIA H800 Tensor Core GPU datasheet (H800 SXM5 / H800 PCIe)"
_H20 = "NVIDIA HGX H20 product brief (as printed by server vendors)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_GH200 = "https://resources.nvidia.com/en-us-grace-cpu/grace-hopper-superchip"
_HGX = "https://www.nvidia.com/en-us/data-center/hgx/"
_GB200 = "https://www.nvidia.com/en-us/data-center/gb200-nvl72/"
_GB300 = "https://www.nvidia.com/en-us/data-center/gb300-nvl72/"
_MI250X = "https://www.amd.com/en/products/accelerators/instinct/mi200/mi250x.html"
_MI300X = "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html"
_MI325X = "https://www.amd.com/en/products/accelerators/instinct/mi300/mi325x.html"

# H100 SXM5 and H200 SXM: the same GH100 compute. fp64 tensor 67, fp32 67, tf32 989*,
# bf16/fp16 1979*, fp8/int8 3958*.
_HOPPER_SXM = {
    "fp64": 67.0,
    "fp32": 67.0,
    "tf32": _sparse(989),
    "bf16": _sparse(1979),
    "fp16": _sparse(1979),
    "fp8": _sparse(3958),
    "int8": _sparse(3958),
}
# H100 NVL and H200 NVL (PCIe cards): fp64 tensor 60, fp32 60, tf32 835*, bf16/fp16 1671*, fp8/int8 3341*.
_HOPPER_NVL = {
    "fp64": 60.0,
    "fp32": 60.0,
    "tf32": _sparse(835),
    "bf16": _sparse(1671),
    "fp16": _sparse(1671),
    "fp8": _sparse(3341),
    "int8": _sparse(3341),
}
# A100 and A800 (SXM4 and PCIe, 40 and 80 GB): fp64 tensor 19.5, fp32 19.5, tf32 156 | 312*,
# bf16/fp16 312 | 624*, int8 624 | 1248*.
_GA100 = {"fp64": 19.5, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "int8": 624.0}
# AMD MI300X and MI325X (same CDNA3 compute, 304 CUs): fp64/fp32 matrix 163.4, tf32 653.7,
# bf16/fp16 1307.4, fp8/int8 2614.9 (dense; AMD prints sparsity separately).
_CDNA3 = {
    "fp64": 163.4,
    "fp32": 163.4,
    "tf32": 653.7,
    "bf16": 1307.4,
    "fp16": 1307.4,
    "fp8": 2614.9,
    "int8": 2614.9,
}

_ROWS: list[tuple[tuple[str, ...], DevicePeak]] = [
    # --- Volta ---------------------------------------------------------------------------------
    (
        ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-SXM3-32GB"),
        # fp64 7.8, fp32 15.7, tensor (fp16, fp32 accumulate) 125; no bf16/tf32/int8 tensor cores
        DevicePeak(
            "NVIDIA V100 SXM2",
            {"fp64": 7.8, "fp32": 15.7, "fp16": 125.0},
            _V100,
            note="V100-SXM3-32GB (DGX-2): 2 PFLOPS / 16 GPUs = 125 TFLOPS, the SXM2 rate",
        ),
    ),
    (
        ("Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB"),
        DevicePeak("NVIDIA V100 PCIe", {"fp64": 7.0, "fp32": 14.0, "fp16": 112.0}, _V100),
    ),
    (
        ("Tesla V100S-PCIE-32GB",),
        DevicePeak("NVIDIA V100S PCIe", {"fp64": 8.2, "fp32": 16.4, "fp16": 130.0}, _V100),
    ),
    # --- Turing --------------------------------------------------------------------------------
    (
        ("Tesla T4",),
        # fp32 8.1, mixed fp16/fp32 65, int8 130; fp64 not printed
        DevicePeak("NVIDIA T4", {"fp32": 8.1, "fp16": 65.0, "int8": 130.0}, _T4),
    ),
    # --- Ampere --------------------------------------------------------------------------------
    (
        ("NVIDIA A10",),
        # fp32 31.2, tf32 62.5 | 125*, bf16/fp16 125 | 250*, int8 250 | 500*
        DevicePeak(
            "NVIDIA A10",
            {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0, "int8": 250.0},
            _A10,
        ),
    ),
    (
        ("NVIDIA A10G",),
        # AWS-only GA102 part with no NVIDIA datasheet: 80 SMs at 1.71 GHz, tensor cores at the
        # GeForce rate (half of A10's per SM): fp32 35, tf32 35, bf16/fp16 70, int8 140
        DevicePeak(
            "NVIDIA A10G (AWS)",
            {"fp32": 35.0, "tf32": 35.0, "bf16": 70.0, "fp16": 70.0, "int8": 140.0},
            _A10G,
            note="no NVIDIA datasheet; figures as published for AWS G5; not the A10's 125",
        ),
    ),
    (
        ("NVIDIA A30",),
        # fp64 tensor 10.3, fp32 10.3, tf32 82 | 165*, bf16/fp16 165 | 330*, int8 330 | 661*
        DevicePeak(
            "NVIDIA A30",
            {"fp64": 10.3, "fp32": 10.3, "tf32": 82.0, "bf16": 165.0, "fp16": 165.0, "int8": 330.0},
            _A30,
            sm_count=56,
        ),
    ),
    (
        ("NVIDIA A40",),
        # fp32 37.4, tf32 74.8 | 149.6*, bf16/fp16 149.7 | 299.4*, int8 299.3 | 598.6*
        DevicePeak(
            "NVIDIA A40",
            {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7, "int8": 299.3},
            _A40,
        ),
    ),
    (
        (
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100-PCIE-40GB",
            "NVIDIA A100 80GB PCIe",
            "NVIDIA A100-PCIE-80GB",
            "NVIDIA A100-PG509-200",  # A100 SXM4 40GB board (PCI 20B0)
            "NVIDIA PG509-210",  # A100 SXM4 80GB board (PCI 20B2)
            "A100-SXM4-40GB",  # drivers before R460 had no "NVIDIA " prefix
            "A100-PCIE-40GB",
            "A100-SXM-80GB",
        ),
        DevicePeak("NVIDIA A100", _GA100, _A100, sm_count=108),
    ),
    (
        (
            "NVIDIA A800-SXM4-40GB",
            "NVIDIA A800-SXM4-80GB",
            "NVIDIA A800 80GB PCIe",
            "NVIDIA A800 80GB PCIe LC",
        ),
        DevicePeak("NVIDIA A800", _GA100, _A800, sm_count=108, note="A100 compute, NVLink cut to 400 GB/s"),
    ),
    (
        ("NVIDIA RTX A6000",),
        # fp32 38.7; fp16 (fp32 accumulate) / bf16 154.8 | 309.7*, tf32 77.4 | 154.8*, int8 309.7 | 619.4*
        DevicePeak(
            "NVIDIA RTX A6000",
            {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8, "fp16": 154.8, "int8": 309.7},
            _GA102,
        ),
    ),
    (
        ("NVIDIA GeForce RTX 3090",),
        # fp32 35.6; fp16 with fp32 accumulate 71 | 142* (with fp16 accumulate 142 | 284*);
        # bf16 71 | 142*, tf32 35.6 | 71*, int8 284 | 568*
        DevicePeak(
            "NVIDIA GeForce RTX 3090",
            {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0, "int8": 284.0},
            _GA102,
            note="GeForce: fp16/bf16 at the fp32-accumulate rate (71), half the fp16-accumulate 142",
        ),
    ),
    # --- Ada Lovelace --------------------------------------------------------------------------
    (
        ("NVIDIA GeForce RTX 4090",),
        # fp32 82.6; fp16 with fp32 accumulate 165.2 | 330.4* (fp16 accumulate 330.3 | 660.6*);
        # bf16 165.2, tf32 82.6, fp8 with fp32 accumulate 330.3 | 660.6* (fp16 acc. 660.6), int8 660.6
        DevicePeak(
            "NVIDIA GeForce RTX 4090",
            {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "int8": 660.6},
            _ADA,
            note="GeForce: fp16/bf16/fp8 at the fp32-accumulate rate, half the headline fp16-accumulate rate",
        ),
    ),
    (
        ("NVIDIA RTX 6000 Ada Generation",),
        # fp32 91.1; fp16 (fp32 accumulate) / bf16 364.2 | 728.5*, tf32 182.1 | 364.2*,
        # fp8 728.5 | 1457*, int8 728.5 | 1457*
        DevicePeak(
            "NVIDIA RTX 6000 Ada Generation",
            {"fp32": 91.1, "tf32": 182.1, "bf16": 364.2, "fp16": 364.2, "fp8": 728.5, "int8": 728.5},
            _ADA,
        ),
    ),
    (
        ("NVIDIA L4",),
        # fp32 30.3; tf32 120*, bf16/fp16 242*, fp8/int8 485* (printed with sparsity only)
        DevicePeak(
            "NVIDIA L4",
            {
                "fp32": 30.3,
                "tf32": _sparse(120),
                "bf16": _sparse(242),
                "fp16": _sparse(242),
                "fp8": _sparse(485),
                "int8": _sparse(485),
            },
            _L4,
        ),
    ),
    (
        ("NVIDIA L40",),
        # fp32 90.5; tf32 90.5 | 181*, bf16/fp16 181.05 | 362.1*, fp8/int8 362 | 724*
        DevicePeak(
            "NVIDIA L40",
            {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05, "fp8": 362.0, "int8": 362.0},
            _L40,
        ),
    ),
    (
        ("NVIDIA L40S",),
        # fp32 91.6; tf32 183 | 366*, bf16/fp16 362.05 | 733*, fp8/int8 733 | 1466*
        DevicePeak(
            "NVIDIA L40S",
            {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0, "int8": 733.0},
            _L40S,
        ),
    ),
    # --- Hopper --------------------------------------------------------------------------------
    (("NVIDIA H100 80GB HBM3",), DevicePeak("NVIDIA H100 SXM5", _HOPPER_SXM, _H100, sm_count=132)),
    (
        ("NVIDIA H100 PCIe",),
        # fp64 tensor 51, fp32 51, tf32 756*, bf16/fp16 1513*, fp8/int8 3026*
        DevicePeak(
            "NVIDIA H100 PCIe",
            {
                "fp64": 51.0,
                "fp32": 51.0,
                "tf32": _sparse(756),
                "bf16": _sparse(1513),
                "fp16": _sparse(1513),
                "fp8": _sparse(3026),
                "int8": _sparse(3026),
            },
            _H100,
            sm_count=114,
        ),
    ),
    (("NVIDIA H100 NVL",), DevicePeak("NVIDIA H100 NVL", _HOPPER_NVL, _H100, sm_count=132)),
    (
        ("NVIDIA H800",),
        # H100 SXM5 with fp64 cut to 1 TFLOPS: fp32 67, tf32 989*, bf16/fp16 1979*, fp8/int8 3958*
        DevicePeak("NVIDIA H800 SXM5", {**_HOPPER_SXM, "fp64": 1.0}, _H800, sm_count=132),
    ),
    (
        ("NVIDIA H800 PCIe",),
        # fp64 0.8, fp32 51, tf32 756*, bf16/fp16 1513*, fp8/int8 3026*
        DevicePeak(
            "NVIDIA H800 PCIe",
            {
                "fp64": 0.8,
                "fp32": 51.0,
                "tf32": _sparse(756),
                "bf16": _sparse(1513),
                "fp16": _sparse(1513),
                "fp8": _sparse(3026),
                "int8": _sparse(3026),
            },
            _H800,
            sm_count=114,
        ),
    ),
    (
        ("NVIDIA H20",),
        # export-limited GH100, 78 SMs: fp64 1, fp32 44, tf32 74, bf16/fp16 148, fp8/int8 296 (dense)
        DevicePeak(
            "NVIDIA H20",
            {
                "fp64": 1.0,
                "fp32": 44.0,
                "tf32": 74.0,
                "bf16": 148.0,
                "fp16": 148.0,
                "fp8": 296.0,
                "int8": 296.0,
            },
            _H20,
            sm_count=78,
            note="not an H200: about 15% of its bf16 peak",
        ),
    ),
    (("NVIDIA H200",), DevicePeak("NVIDIA H200 SXM", _HOPPER_SXM, _H200, sm_count=132)),
    (("NVIDIA H200 NVL",), DevicePeak("NVIDIA H200 NVL", _HOPPER_NVL, _H200, sm_count=132)),
    (
        ("NVIDIA GH200 480GB", "NVIDIA GH200 120GB", "NVIDIA GH200 144G HBM3e"),
        # the Hopper GPU of the Grace Hopper superchip: H100 SXM5 compute
        DevicePeak("NVIDIA GH200 (Hopper GPU)", _HOPPER_SXM, _GH200, sm_count=132),
    ),
    # --- Blackwell -----------------------------------------------------------------------------
    (
        ("NVIDIA B200",),
        # HGX B200, per GPU: fp64 37, fp32 75, tf32 2.2 P*, bf16/fp16 4.5 P*, fp8/int8 9 P*, fp4 18 P*
        DevicePeak(
            "NVIDIA B200 (HGX)",
            {
                "fp64": 37.0,
                "fp32": 75.0,
                "tf32": _sparse(2200),
                "bf16": _sparse(4500),
                "fp16": _sparse(4500),
                "fp8": _sparse(9000),
                "int8": _sparse(9000),
                "fp4": _sparse(18000),
            },
            _HGX,
            sm_count=148,
        ),
    ),
    (
        ("NVIDIA GB200",),
        # GB200 NVL72, per GPU: fp64 40, fp32 80, tf32 2.5 P*, bf16/fp16 5 P*, fp8/int8 10 P*, fp4 20 P*
        DevicePeak(
            "NVIDIA GB200 (Blackwell GPU)",
            {
                "fp64": 40.0,
                "fp32": 80.0,
                "tf32": _sparse(2500),
                "bf16": _sparse(5000),
                "fp16": _sparse(5000),
                "fp8": _sparse(10000),
                "int8": _sparse(10000),
                "fp4": _sparse(20000),
            },
            _GB200,
            sm_count=152,
            note="not a B200: higher clocks and power (1200 W)",
        ),
    ),
    (
        ("NVIDIA B300 SXM6 AC", "NVIDIA B300"),
        # HGX B300, 8 GPUs: fp64 10 T, fp32 600 T, tf32 18 P*, bf16/fp16 36 P*, fp8 72 P*,
        # fp4 144 P* | 108 P dense; divided by 8. INT8 is cut on Blackwell Ultra and left out.
        DevicePeak(
            "NVIDIA B300 (HGX)",
            {
                "fp64": 10.0 / 8,
                "fp32": 600.0 / 8,
                "tf32": _sparse(18000 / 8),
                "bf16": _sparse(36000 / 8),
                "fp16": _sparse(36000 / 8),
                "fp8": _sparse(72000 / 8),
                "fp4": 108000.0 / 8,
            },
            _HGX,
            sm_count=148,
        ),
    ),
    (
        ("NVIDIA GB300",),
        # GB300 NVL72, 72 GPUs: tf32 180 P*, bf16/fp16 360 P*, fp8 720 P*, fp4 1440 P* | 1080 P dense
        DevicePeak(
            "NVIDIA GB300 (Blackwell Ultra GPU)",
            {
                "tf32": _sparse(180000 / 72),
                "bf16": _sparse(360000 / 72),
                "fp16": _sparse(360000 / 72),
                "fp8": _sparse(720000 / 72),
                "fp4": 1080000.0 / 72,
            },
            _GB300,
        ),
    ),
    # --- AMD Instinct (names as torch reports them on ROCm) -------------------------------------
    (
        ("AMD Instinct MI250X", "AMD Instinct MI250X / MI250"),
        # datasheet per OAM (2 GCDs): fp64/fp32 matrix 95.7, bf16/fp16/int8 383. torch sees each
        # GCD (110 CUs) as one device, so per device: half of each.
        DevicePeak(
            "AMD Instinct MI250X (one GCD)",
            {"fp64": 95.7 / 2, "fp32": 95.7 / 2, "bf16": 383.0 / 2, "fp16": 383.0 / 2, "int8": 383.0 / 2},
            _MI250X,
            sm_count=110,
            note="per GCD; an MI250 GCD (104 CUs, same clock) is scaled by its CU count",
        ),
    ),
    (
        ("AMD Instinct MI300X", "AMD Instinct MI300X VF"),
        DevicePeak(
            "AMD Instinct MI300X", _CDNA3, _MI300X, sm_count=304, note="CPX/QPX partitions scale by CUs"
        ),
    ),
    (
        ("AMD Instinct MI325X", "AMD Instinct MI325X VF"),
        DevicePeak(
            "AMD Instinct MI325X", _CDNA3, _MI325X, sm_count=304, note="CPX/QPX partitions scale by CUs"
        ),
    ),
]


def _build(rows: list[tuple[tuple[str, ...], DevicePeak]]) -> dict[str, DevicePeak]:
    table: dict[str, DevicePeak] = {}
    seen: dict[str, str] = {}
    for names, peak in rows:
        row = DevicePeak(peak.product, peak.tflops, peak.source, peak.sm_count, peak.note, names=names)
        for name in names:
            key = normalize_name(name)
            if key in seen:  # a name in two rows would make the table ambiguous
                raise ValueError(f"device name {name!r} is in rows {seen[key]!r} and {peak.product!r}")
            seen[key] = peak.product
            table[name] = row
    return table


PEAKS: dict[str, DevicePeak] = _build(_ROWS)  # exact driver name -> row; aliases share a row
_INDEX: dict[str, DevicePeak] = {normalize_name(name): row for name, row in PEAKS.items()}


def lookup(name: str) -> DevicePeak | None:
    """The row for an exact driver name (whitespace and case normalized); None if not in the table."""
    return _INDEX.get(normalize_name(name))


# ---------------------------------------------------------------------------------------------
# Memory bandwidth per driver name: the datasheet's peak DRAM (HBM / GDDR) bandwidth of one device,
# in GB/s (10^9 bytes/s). Per name, not per row: the 40 GB and 80 GB A100 share compute, not memory.
# Multi-GPU systems' figures are divided by their GPU count; an MI250X GCD gets half of the OAM's.
# A name with no published figure is absent (its bandwidth is None), never borrowed from a sibling.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBandwidth:
    """One device's datasheet memory bandwidth in GB/s, its memory, and the datasheet."""

    gbs: float  # peak DRAM bandwidth, GB/s (10^9 bytes/s)
    memory: str  # what the datasheet names (size and kind), for people
    source: str


_BANDWIDTH_ROWS: list[tuple[tuple[str, ...], MemoryBandwidth]] = [
    (
        ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-SXM3-32GB"),
        MemoryBandwidth(900, "16/32 GB HBM2", _V100),
    ),
    (("Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB"), MemoryBandwidth(900, "16/32 GB HBM2", _V100)),
    (("Tesla V100S-PCIE-32GB",), MemoryBandwidth(1134, "32 GB HBM2", _V100)),
    (("Tesla T4",), MemoryBandwidth(320, "16 GB GDDR6 (printed 320+ GB/s)", _T4)),
    (("NVIDIA A10",), MemoryBandwidth(600, "24 GB GDDR6", _A10)),
    (("NVIDIA A10G",), MemoryBandwidth(600, "24 GB GDDR6", _A10G)),
    (("NVIDIA A30",), MemoryBandwidth(933, "24 GB HBM2", _A30)),
    (("NVIDIA A40",), MemoryBandwidth(696, "48 GB GDDR6", _A40)),
    (
        (
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-PG509-200",
            "A100-SXM4-40GB",
            "NVIDIA A100-PCIE-40GB",
            "A100-PCIE-40GB",
        ),
        MemoryBandwidth(1555, "40 GB HBM2", _A100),
    ),
    (
        ("NVIDIA A100-SXM4-80GB", "NVIDIA PG509-210", "A100-SXM-80GB"),
        MemoryBandwidth(2039, "80 GB HBM2e", _A100),
    ),
    (("NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-80GB"), MemoryBandwidth(1935, "80 GB HBM2e", _A100)),
    (("NVIDIA A800-SXM4-40GB",), MemoryBandwidth(1555, "40 GB HBM2", _A800)),
    (("NVIDIA A800-SXM4-80GB",), MemoryBandwidth(2039, "80 GB HBM2e", _A800)),
    (("NVIDIA A800 80GB PCIe", "NVIDIA A800 80GB PCIe LC"), MemoryBandwidth(1935, "80 GB HBM2e", _A800)),
    (("NVIDIA RTX A6000",), MemoryBandwidth(768, "48 GB GDDR6", _GA102)),
    (("NVIDIA GeForce RTX 3090",), MemoryBandwidth(936, "24 GB GDDR6X", _GA102)),
    (("NVIDIA GeForce RTX 4090",), MemoryBandwidth(1008, "24 GB GDDR6X", _ADA)),
    (("NVIDIA RTX 6000 Ada Generation",), MemoryBandwidth(960, "48 GB GDDR6", _ADA)),
    (("NVIDIA L4",), MemoryBandwidth(300, "24 GB GDDR6", _L4)),
    (("NVIDIA L40",), MemoryBandwidth(864, "48 GB GDDR6", _L40)),
    (("NVIDIA L40S",), MemoryBandwidth(864, "48 GB GDDR6", _L40S)),
    (("NVIDIA H100 80GB HBM3",), MemoryBandwidth(3350, "80 GB HBM3", _H100)),
    (("NVIDIA H100 PCIe",), MemoryBandwidth(2000, "80 GB HBM2e", _H100)),
    (("NVIDIA H100 NVL",), MemoryBandwidth(3900, "94 GB HBM3", _H100)),
    (("NVIDIA H800",), MemoryBandwidth(3350, "80 GB HBM3", _H800)),
    (("NVIDIA H800 PCIe",), MemoryBandwidth(2000, "80 GB HBM2e", _H800)),
    (("NVIDIA H20",), MemoryBandwidth(4000, "96 GB HBM3", _H20)),
    (("NVIDIA H200",), MemoryBandwidth(4800, "141 GB HBM3e", _H200)),
    (("NVIDIA H200 NVL",), MemoryBandwidth(4800, "141 GB HBM3e", _H200)),
    (("NVIDIA GH200 480GB",), MemoryBandwidth(4000, "96 GB HBM3 (beside 480 GB LPDDR5X)", _GH200)),
    (("NVIDIA GH200 144G HBM3e",), MemoryBandwidth(4900, "144 GB HBM3e", _GH200)),
    (("NVIDIA B200",), MemoryBandwidth(64000 / 8, "HGX B200: 64 TB/s over 8 GPUs", _HGX)),
    (("NVIDIA GB200",), MemoryBandwidth(576000 / 72, "GB200 NVL72: 576 TB/s over 72 GPUs", _GB200)),
    (
        ("NVIDIA B300 SXM6 AC", "NVIDIA B300"),
        MemoryBandwidth(64000 / 8, "HGX B300: 64 TB/s over 8 GPUs", _HGX),
    ),
    (("NVIDIA GB300",), MemoryBandwidth(576000 / 72, "GB300 NVL72: 576 TB/s over 72 GPUs", _GB300)),
    (
        ("AMD Instinct MI250X", "AMD Instinct MI250X / MI250"),
        MemoryBandwidth(3276.8 / 2, "64 GB HBM2e per GCD (3.2768 TB/s per OAM of 2 GCDs)", _MI250X),
    ),
    (("AMD Instinct MI300X", "AMD Instinct MI300X VF"), MemoryBandwidth(5300, "192 GB HBM3", _MI300X)),
    (("AMD Instinct MI325X", "AMD Instinct MI325X VF"), MemoryBandwidth(6000, "256 GB HBM3E", _MI325X)),
]

BANDWIDTH: dict[str, MemoryBandwidth] = {name: row for names, row in _BANDWIDTH_ROWS for name in names}
_BANDWIDTH_INDEX = {normalize_name(name): row for name, row in BANDWIDTH.items()}


def lookup_bandwidth(name: str) -> MemoryBandwidth | None:
    """The datasheet memory bandwidth of an exact driver name (normalized as `lookup`); None if unknown."""
    return _BANDWIDTH_INDEX.get(normalize_name(name))
