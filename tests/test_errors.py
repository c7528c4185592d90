"""The one int check and the one report-once mechanism."""

from __future__ import annotations

import pytest

from mfumon.errors import ConfigError, ConfigTypeError, FaultLog, check_int
from tests.conftest import mfumon_records


def test_check_int_names_the_argument_and_what_it_counts() -> None:
    assert check_int("log_every", 10, "optimizer steps per log") == 10
    assert check_int("warmup", 0, "steps", minimum=0) == 0
    with pytest.raises(
        ConfigError, match=r"log_every must be an int >= 1 \(optimizer steps per log\), got 0"
    ):
        check_int("log_every", 0, "optimizer steps per log")
    for wrong_kind in ("10", 2.0, True, None):
        with pytest.raises(ConfigTypeError, match="log_every must be an int >= 1"):
            check_int("log_every", wrong_kind, "optimizer steps per log")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


def test_fault_log_reports_each_kind_once_and_never_raises(mfumon_log: pytest.LogCaptureFixture) -> None:
    faults = FaultLog()
    assert faults.fault("timing", ValueError("clock went backwards")) is True
    assert faults.fault("timing", ValueError("again")) is False  # once per kind
    assert faults.fault("nvml", Unprintable()) is True  # formatting is logging's, which never raises
    records = mfumon_records(mfumon_log)
    assert len(records) == 2
    assert records[0].getMessage() == (
        "mfumon: timing fault (ValueError: clock went backwards); this part is skipped, training goes on"
    )
    assert faults.seen("nvml") and not faults.seen("dtype")
    faults.clear()
    assert faults.fault("timing", ValueError("a new run")) is True
