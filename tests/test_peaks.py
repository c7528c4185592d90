"""The peak table: every driver name maps to its datasheet's dense numbers, and nothing else matches."""

from __future__ import annotations

import math

import pytest

from mfumon import peak_flops
from mfumon._peaks import BANDWIDTH, DTYPES, PEAKS, lookup, lookup_bandwidth, normalize_name
from mfumon.hardware import memory_bandwidth

T = 1e12

# Every driver name in the table, with the datasheet arithmetic of its bf16 (or fp16) peak.
# "/ 2" undoes a "with sparsity" figure; per-GPU rows of multi-GPU systems divide by the GPU count.
EXPECTED_BY_NAME: dict[str, tuple[str, float]] = {
    # Volta: fp16 tensor rate, no bf16
    "Tesla V100-SXM2-16GB": ("fp16", 125),
    "Tesla V100-SXM2-32GB": ("fp16", 125),
    "Tesla V100-SXM3-32GB": ("fp16", 2000 / 16),  # DGX-2: 2 PFLOPS over 16 GPUs
    "Tesla V100-PCIE-16GB": ("fp16", 112),
    "Tesla V100-PCIE-32GB": ("fp16", 112),
    "Tesla V100S-PCIE-32GB": ("fp16", 130),
    "Tesla T4": ("fp16", 65),
    # Ampere
    "NVIDIA A10": ("bf16", 250 / 2),
    "NVIDIA A10G": ("bf16", 70),  # GeForce-rate tensor cores: not the A10's 125
    "NVIDIA A30": ("bf16", 330 / 2),
    "NVIDIA A40": ("bf16", 149.7),
    "NVIDIA A100-SXM4-40GB": ("bf16", 624 / 2),
    "NVIDIA A100-SXM4-80GB": ("bf16", 624 / 2),
    "NVIDIA A100-PCIE-40GB": ("bf16", 624 / 2),
    "NVIDIA A100 80GB PCIe": ("bf16", 624 / 2),
    "NVIDIA A100-PCIE-80GB": ("bf16", 624 / 2),
    "NVIDIA A100-PG509-200": ("bf16", 624 / 2),
    "NVIDIA PG509-210": ("bf16", 624 / 2),
    "A100-SXM4-40GB": ("bf16", 624 / 2),
    "A100-PCIE-40GB": ("bf16", 624 / 2),
    "A100-SXM-80GB": ("bf16", 624 / 2),
    "NVIDIA A800-SXM4-40GB": ("bf16", 624 / 2),
    "NVIDIA A800-SXM4-80GB": ("bf16", 624 / 2),
    "NVIDIA A800 80GB PCIe": ("bf16", 624 / 2),
    "NVIDIA A800 80GB PCIe LC": ("bf16", 624 / 2),
    "NVIDIA RTX A6000": ("bf16", 154.8),  # printed dense, beside 309.7 with sparsity
    "NVIDIA GeForce RTX 3090": ("fp16", 142 / 2),  # fp32-accumulate rate, half the 142 headline
    # Ada
    "NVIDIA GeForce RTX 4090": ("bf16", 330.4 / 2),  # fp32-accumulate rate, not 330.3
    "NVIDIA RTX 6000 Ada Generation": ("bf16", 364.2),  # printed dense, beside 728.5 sparse
    "NVIDIA L4": ("bf16", 242 / 2),
    "NVIDIA L40": ("bf16", 362.1 / 2),
    "NVIDIA L40S": ("bf16", 362.05),  # printed dense, beside 733 with sparsity
    # Hopper
    "NVIDIA H100 80GB HBM3": ("bf16", 1979 / 2),
    "NVIDIA H100 PCIe": ("bf16", 1513 / 2),
    "NVIDIA H100 NVL": ("bf16", 1671 / 2),
    "NVIDIA H800": ("bf16", 1979 / 2),
    "NVIDIA H800 PCIe": ("bf16", 1513 / 2),
    "NVIDIA H20": ("bf16", 148),
    "NVIDIA H200": ("bf16", 1979 / 2),
    "NVIDIA H200 NVL": ("bf16", 1671 / 2),
    "NVIDIA GH200 480GB": ("bf16", 1979 / 2),
    "NVIDIA GH200 120GB": ("bf16", 1979 / 2),
    "NVIDIA GH200 144G HBM3e": ("bf16", 1979 / 2),
    # Blackwell
    "NVIDIA B200": ("bf16", 4500 / 2),
    "NVIDIA GB200": ("bf16", 5000 / 2),
    "NVIDIA B300 SXM6 AC": ("bf16", 36000 / 8 / 2),  # HGX B300: 36 PFLOPS* over 8 GPUs
    "NVIDIA B300": ("bf16", 36000 / 8 / 2),
    "NVIDIA GB300": ("bf16", 360000 / 72 / 2),  # GB300 NVL72: 360 PFLOPS* over 72 GPUs
    # AMD, one torch device each (an MI250X is two GCDs, so half the OAM's 383)
    "AMD Instinct MI250X": ("bf16", 383 / 2),
    "AMD Instinct MI250X / MI250": ("bf16", 383 / 2),
    "AMD Instinct MI300X": ("bf16", 1307.4),
    "AMD Instinct MI300X VF": ("bf16", 1307.4),
    "AMD Instinct MI325X": ("bf16", 1307.4),
    "AMD Instinct MI325X VF": ("bf16", 1307.4),
}

# Whole rows, every dtype, for the parts people train on most.
EXPECTED_ROWS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {
        "fp64": 67,  # FP64 Tensor Core
        "fp32": 67,
        "tf32": 989 / 2,
        "bf16": 1979 / 2,
        "fp16": 1979 / 2,
        "fp8": 3958 / 2,
        "int8": 3958 / 2,
    },
    "NVIDIA A100-SXM4-80GB": {"fp64": 19.5, "fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312, "int8": 624},
    "NVIDIA H100 PCIe": {
        "fp64": 51,
        "fp32": 51,
        "tf32": 756 / 2,
        "bf16": 1513 / 2,
        "fp16": 1513 / 2,
        "fp8": 3026 / 2,
        "int8": 3026 / 2,
    },
    "NVIDIA L40S": {
        "fp32": 91.6,
        "tf32": 366 / 2,
        "bf16": 362.05,
        "fp16": 362.05,
        "fp8": 1466 / 2,
        "int8": 1466 / 2,
    },
    "NVIDIA B200": {
        "fp64": 37,
        "fp32": 75,
        "tf32": 2200 / 2,
        "bf16": 4500 / 2,
        "fp16": 4500 / 2,
        "fp8": 9000 / 2,
        "int8": 9000 / 2,
        "fp4": 18000 / 2,
    },
    "NVIDIA B300 SXM6 AC": {
        "fp64": 10 / 8,
        "fp32": 600 / 8,
        "tf32": 18000 / 8 / 2,
        "bf16": 36000 / 8 / 2,
        "fp16": 36000 / 8 / 2,
        "fp8": 72000 / 8 / 2,
        "fp4": 108000 / 8,  # HGX B300 prints dense FP4 (108 PFLOPS) beside 144 sparse
    },
    "NVIDIA GeForce RTX 4090": {
        "fp32": 82.6,
        "tf32": 165.2 / 2,
        "bf16": 330.4 / 2,
        "fp16": 330.4 / 2,
        "fp8": 660.6 / 2,
        "int8": 1321.2 / 2,
    },
    "AMD Instinct MI300X": {
        "fp64": 163.4,
        "fp32": 163.4,
        "tf32": 653.7,
        "bf16": 1307.4,
        "fp16": 1307.4,
        "fp8": 2614.9,
        "int8": 2614.9,
    },
}


def test_every_table_name_has_an_expected_peak() -> None:
    assert set(PEAKS) == set(EXPECTED_BY_NAME)


@pytest.mark.parametrize("name", sorted(EXPECTED_BY_NAME))
def test_peak_of_every_driver_name(name: str) -> None:
    dtype, tflops = EXPECTED_BY_NAME[name]
    assert peak_flops(name, dtype) == pytest.approx(tflops * T, rel=1e-12)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_whole_rows(name: str) -> None:
    expected = EXPECTED_ROWS[name]
    for dtype in DTYPES:
        want = expected.get(dtype)
        got = peak_flops(name, dtype)
        assert (got is None) == (want is None), (name, dtype)
        if want is not None:
            assert got == pytest.approx(want * T, rel=1e-12), (name, dtype)


@pytest.mark.parametrize(
    ("name", "other", "ratio"),
    [
        ("NVIDIA L40", "NVIDIA L4", 181.05 / 121),  # nanochat / Lightning give the L40 the L4's peak
        ("NVIDIA L40S", "NVIDIA L4", 362.05 / 121),  # a 3x error when "l4" is a substring test
        ("NVIDIA H200", "NVIDIA H20", 989.5 / 148),  # H20 is export-limited, not an H200
        ("NVIDIA GB200", "NVIDIA B200", 2500 / 2250),  # GB200 runs at 1200 W, B200 at 1000 W
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A10", 312 / 125),
        ("NVIDIA A10", "NVIDIA A10G", 125 / 70),
        ("NVIDIA RTX 6000 Ada Generation", "NVIDIA GeForce RTX 4090", 364.2 / 165.2),
    ],
)
def test_pitfall_pairs_are_different_rows(name: str, other: str, ratio: float) -> None:
    assert lookup(name) is not lookup(other)
    bf16, other_bf16 = peak_flops(name, "bf16"), peak_flops(other, "bf16")
    assert bf16 is not None and other_bf16 is not None
    assert bf16 / other_bf16 == pytest.approx(ratio, rel=1e-9)


def test_h200_and_gh200_are_separate_rows() -> None:
    # same Hopper compute, but one is not a substring match of the other
    assert lookup("NVIDIA H200") is not lookup("NVIDIA GH200 480GB")
    assert lookup("NVIDIA H200").product == "NVIDIA H200 SXM"  # type: ignore[union-attr]
    assert lookup("NVIDIA GH200 480GB").product == "NVIDIA GH200 (Hopper GPU)"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100",  # a real driver name (PCI 2339) of an H100 variant the table does not cover
        "H100",
        "NVIDIA A100",
        "NVIDIA GH200",
        "NVIDIA L4 24GB",
        "NVIDIA H20-3e",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice's own name must not count as the full GPU
        "GeForce RTX 4090",
        "NVIDIA GeForce RTX 4090 D",  # the China 4090 has fewer SMs
        "",
    ],
)
def test_names_not_in_the_table_have_no_peak(name: str) -> None:
    assert lookup(name) is None
    assert peak_flops(name, "bf16") is None


def test_lookup_normalizes_whitespace_and_case_only() -> None:
    assert lookup("  nvidia   l40s ") is lookup("NVIDIA L40S")
    assert lookup("NVIDIA-L40S") is None  # the device plugin's label form is not a driver name


def test_dtype_a_device_lacks_is_none() -> None:
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None  # Ampere has no fp8
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp4") is None


def test_table_is_well_formed() -> None:
    rows = {id(row): row for row in PEAKS.values()}.values()
    for row in rows:
        assert row.source and row.product
        assert row.names and all(PEAKS[name] is row for name in row.names)
        assert set(row.tflops) <= set(DTYPES)
        assert all(math.isfinite(v) and v > 0 for v in row.tflops.values())
    keys = [normalize_name(name) for name in PEAKS]
    assert len(keys) == len(set(keys))  # no two names collide after normalization


def test_rows_are_read_only() -> None:
    row = lookup("NVIDIA H100 80GB HBM3")
    assert row is not None
    with pytest.raises(TypeError):
        row.tflops["bf16"] = 1.0  # type: ignore[index]


# Memory bandwidth, GB/s, per driver name: the datasheet's figure (TB/s x 1000), per-GPU shares of
# multi-GPU systems divided out. None: no published figure for that name.
EXPECTED_BANDWIDTH: dict[str, float | None] = {
    "Tesla V100-SXM2-16GB": 900,
    "Tesla V100-SXM2-32GB": 900,
    "Tesla V100-SXM3-32GB": 900,
    "Tesla V100-PCIE-16GB": 900,
    "Tesla V100-PCIE-32GB": 900,
    "Tesla V100S-PCIE-32GB": 1134,
    "Tesla T4": 320,
    "NVIDIA A10": 600,
    "NVIDIA A10G": 600,
    "NVIDIA A30": 933,
    "NVIDIA A40": 696,
    "NVIDIA A100-SXM4-40GB": 1555,  # the 40 GB parts: 1.555 TB/s
    "NVIDIA A100-PG509-200": 1555,
    "A100-SXM4-40GB": 1555,
    "NVIDIA A100-PCIE-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "NVIDIA A100-SXM4-80GB": 2039,  # 80 GB SXM: 2.039 TB/s, same compute row as the 40 GB
    "NVIDIA PG509-210": 2039,
    "A100-SXM-80GB": 2039,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA A100-PCIE-80GB": 1935,
    "NVIDIA A800-SXM4-40GB": 1555,
    "NVIDIA A800-SXM4-80GB": 2039,
    "NVIDIA A800 80GB PCIe": 1935,
    "NVIDIA A800 80GB PCIe LC": 1935,
    "NVIDIA RTX A6000": 768,
    "NVIDIA GeForce RTX 3090": 936,
    "NVIDIA GeForce RTX 4090": 1008,
    "NVIDIA RTX 6000 Ada Generation": 960,
    "NVIDIA L4": 300,
    "NVIDIA L40": 864,
    "NVIDIA L40S": 864,
    "NVIDIA H100 80GB HBM3": 3350,
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA H100 NVL": 3900,
    "NVIDIA H800": 3350,
    "NVIDIA H800 PCIe": 2000,
    "NVIDIA H20": 4000,
    "NVIDIA H200": 4800,
    "NVIDIA H200 NVL": 4800,
    "NVIDIA GH200 480GB": 4000,  # 96 GB HBM3
    "NVIDIA GH200 120GB": None,  # no datasheet names this variant's HBM
    "NVIDIA GH200 144G HBM3e": 4900,
    "NVIDIA B200": 64000 / 8,  # HGX B200: 64 TB/s over 8 GPUs
    "NVIDIA GB200": 576000 / 72,  # GB200 NVL72: 576 TB/s over 72 GPUs
    "NVIDIA B300 SXM6 AC": 64000 / 8,
    "NVIDIA B300": 64000 / 8,
    "NVIDIA GB300": 576000 / 72,
    "AMD Instinct MI250X": 3276.8 / 2,  # per GCD: half the OAM's 3.2768 TB/s
    "AMD Instinct MI250X / MI250": 3276.8 / 2,
    "AMD Instinct MI300X": 5300,
    "AMD Instinct MI300X VF": 5300,
    "AMD Instinct MI325X": 6000,
    "AMD Instinct MI325X VF": 6000,
}


def test_every_table_name_has_an_expected_bandwidth() -> None:
    assert set(EXPECTED_BANDWIDTH) == set(PEAKS)
    assert set(BANDWIDTH) <= set(PEAKS)  # no bandwidth for a device without a peak row


@pytest.mark.parametrize("name", sorted(EXPECTED_BANDWIDTH))
def test_bandwidth_of_every_driver_name(name: str) -> None:
    want = EXPECTED_BANDWIDTH[name]
    row = lookup_bandwidth(name)
    assert (row is None) == (want is None)
    if row is not None:
        assert row.gbs == pytest.approx(want, rel=1e-12)
        assert row.source and row.memory
        assert memory_bandwidth(name) == pytest.approx(want * 1e9, rel=1e-12)


def test_bandwidth_lookup_is_exact() -> None:
    assert lookup_bandwidth(" nvidia  h200 ") is lookup_bandwidth("NVIDIA H200")
    assert lookup_bandwidth("NVIDIA H20") is not lookup_bandwidth("NVIDIA H200")
    assert memory_bandwidth("NVIDIA A100-SXM4-40GB MIG 1g.5gb") is None  # a slice is not the GPU
    assert memory_bandwidth("NVIDIA H100") is None
