"""The TensorBoard logger, read back from its event files with TensorBoard's own reader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, MissingDependencyError
from tests.conftest import train_step
from tests.readback import tb_scalars, tb_texts
from tests.test_monitor import Recorder

pytest.importorskip("tensorboard")


def test_event_files_hold_every_window(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    rec = Recorder()
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=2,
        loggers=("tensorboard", rec),
        peak_tflops=0.25,
        run_name="tb",
        log_dir=tmp_path,
    ) as mon:
        for _ in range(12):
            mon.step(tokens=train_step(model, opt))
    scalars = tb_scalars(tmp_path / "tb")
    assert set(scalars) == set(rec.logs[-1][1])  # one tag per metric key
    assert {K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC} <= set(scalars)  # the ledger's too
    for key in (K.MFU, K.TOKENS_PER_S, K.STEP_TIME_MS, K.MFU_AVG):
        assert [s for s, _ in scalars[key]] == [4, 8, 12]
        # event files store float32
        assert [v for _, v in scalars[key]] == pytest.approx([m[key] for _, m in rec.logs], rel=1e-6)
    texts = tb_texts(tmp_path / "tb")
    assert "| peak_tflops | 0.25 |" in texts["mfumon/run_info"]
    assert "| device | cpu |" in texts["mfumon/run_info"]
    assert f"| steps | {12 - 2} |" in texts["mfumon/summary"]
    assert mon.summary()["steps"] == 10


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'mfumon\[tensorboard\]'"):
        mfumon.Monitor(flops_per_token=1, loggers=("tensorboard",), peak_tflops=1.0, log_dir=tmp_path)


def test_a_path_that_is_a_file_fails_at_setup(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    mon = mfumon.Monitor(
        flops_per_token=1, loggers=("tensorboard",), peak_tflops=1.0, run_name="taken", log_dir=tmp_path
    )
    # file loggers are built at start() (a `with` block's entry), on rank 0; the error names log_dir
    with pytest.raises(ConfigError, match=r"'tensorboard' logger cannot write in log_dir=.*File exists"):
        mon.start()


def test_step_profile_is_text(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    seen: dict[int, Any] = {}

    class Keep(mfumon.Logger):
        def log_profile(self, profile: Any, step: int) -> None:
            seen[step] = profile

    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=0,
        profile_every=4,
        loggers=("tensorboard", Keep()),
        peak_tflops=0.25,
        run_name="tbp",
        log_dir=tmp_path,
    ) as mon:
        for _ in range(8):
            mon.step(tokens=train_step(model, opt))
    assert sorted(seen) == [4, 8]
    text = tb_texts(tmp_path / "tbp")["mfumon/profile"]  # the last one written, step 8's
    assert text == "```\n" + seen[8].table() + "\n```"
    assert "component" in text and "lost ms" in text
