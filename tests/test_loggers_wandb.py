"""The W&B logger, read back from the offline run's own .wandb file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mfumon
from mfumon import metrics as K
from mfumon.errors import MissingDependencyError
from tests.conftest import mfumon_records, train_step
from tests.readback import BLOCK, wandb_run
from tests.test_monitor import Recorder

pytest.importorskip("wandb")


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """WANDB_DIR in tmp_path; wandb's process-wide settings (read from the env once) reset after."""
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.teardown()


def test_reader_joins_records_split_over_blocks(wandb_dir: Path) -> None:
    import wandb

    run = wandb.init(project="blocks", dir=wandb_dir)
    for i in range(300):
        run.log({"i": i}, step=i)
    text = "".join(chr(ord("a") + i % 26) for i in range(2 * BLOCK))  # one row over three blocks
    run.log({"text": text}, step=300)
    run.finish()
    data = wandb_run(wandb_dir)
    assert (data["dir"] / f"run-{run.id}.wandb").stat().st_size > 2 * BLOCK
    assert [r["i"] for r in data["history"] if "i" in r] == list(range(300))
    assert [r["text"] for r in data["history"] if "text" in r] == [text]


def test_offline_run_holds_every_window_and_the_run_facts(tiny, wandb_dir: Path) -> None:
    model, opt = tiny
    rec = Recorder()
    with mfumon.monitor(
        model, seq_len=8, log_every=3, warmup=2, loggers=("wandb", rec), peak_tflops=0.5, run_name="wb"
    ) as mon:
        for _ in range(12):
            mon.step(tokens=train_step(model, opt))
    run = wandb_run(wandb_dir)
    rows = [r for r in run["history"] if K.MFU in r]
    assert [r["mfumon/step"] for r in rows] == [s for s, _ in rec.logs] == [3, 6, 9, 12]
    assert {K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC} <= set(rec.logs[-1][1])  # the ledger rides along
    for row, (_, logged) in zip(rows, rec.logs, strict=True):
        assert {k: row[k] for k in logged} == pytest.approx(logged)
        assert row["_step"] == row["mfumon/step"]  # our own run: W&B's step is the optimizer step
    assert run["config"]["mfumon/device"] == "cpu"
    assert run["config"]["mfumon/peak_dtype"] == "fp32"
    assert run["config"]["mfumon/peak_tflops"] == 0.5
    assert run["summary"][K.MFU_AVG] == pytest.approx(mon.summary()[K.MFU_AVG])
    assert run["summary"][K.TOKENS_PER_S] == pytest.approx(mon.summary()[K.TOKENS_PER_S])
    assert run["dir"].name.startswith("offline-run-")


def test_active_run_is_used_and_left_open(tiny, wandb_dir: Path) -> None:
    import wandb

    model, opt = tiny
    run = wandb.init(project="mine", name="user-run", dir=wandb_dir)
    try:
        with mfumon.monitor(
            model, seq_len=8, log_every=2, warmup=0, loggers=("wandb",), peak_tflops=1.0, run_name="ignored"
        ) as mon:
            for i in range(4):
                mon.step(tokens=train_step(model, opt))
                run.log({"loss": 1.0 / (i + 1)}, step=10 * i)  # the user's own steps
        assert wandb.run is run  # not finished by mfumon
    finally:
        run.finish()
    data = wandb_run(wandb_dir)
    rows = [r for r in data["history"] if K.MFU in r]
    # mfumon never commits the user's run: each window joins the row the user has open, i.e. the
    # user's latest step. Window 2 comes after the user's log at i=0 (step 0), window 4 after i=2 (step 20).
    assert [r["mfumon/step"] for r in rows] == [2, 4]
    assert [r["_step"] for r in rows] == [0, 20]
    assert [r["loss"] for r in rows] == [1.0, 1.0 / 3]
    assert rows[-1][K.MFU] == pytest.approx(mon.metrics[K.MFU])


def test_without_api_key_runs_offline(
    tiny, wandb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mfumon.loggers.wandb_logger import has_wandb_credentials

    monkeypatch.delenv("WANDB_MODE")
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))
    assert not has_wandb_credentials()
    model, opt = tiny
    with mfumon.monitor(model, seq_len=8, log_every=2, warmup=0, loggers=("wandb",), peak_tflops=1.0) as mon:
        for _ in range(2):
            mon.step(tokens=train_step(model, opt))
    assert wandb_run(wandb_dir)["history"]  # an offline run dir, nothing sent anywhere


def test_credentials_from_env_or_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mfumon.loggers.wandb_logger import has_wandb_credentials

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()  # the key is for another host
    monkeypatch.setenv("WANDB_API_KEY", "y" * 40)
    assert has_wandb_credentials()


def test_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'mfumon\[wandb\]'"):
        # raised by the time the monitor starts: its loggers are built once the rank is known
        mfumon.Monitor(flops_per_token=1, loggers=("wandb",), peak_tflops=1.0, log_dir=tmp_path).start()


def test_a_failing_wandb_logger_leaves_training_running(tiny, wandb_dir: Path, mfumon_log) -> None:
    model, opt = tiny
    with mfumon.monitor(model, seq_len=8, log_every=2, warmup=0, loggers=("wandb",), peak_tflops=1.0) as mon:
        mon.step(tokens=train_step(model, opt))
        import wandb

        wandb.run.finish()  # the run goes away under the logger: its next log raises
        for _ in range(5):
            mon.step(tokens=train_step(model, opt))
    assert mon.summary()["steps"] == 1 + 5  # warmup=0: every step is timed
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "WandbLogger" in records[0].getMessage()


def test_step_profile_is_a_table_in_the_offline_run(tiny, wandb_dir: Path) -> None:
    import json

    from mfumon.loggers.wandb_logger import PROFILE_COLUMNS

    model, opt = tiny
    seen: dict[int, Any] = {}

    class Keep(mfumon.Logger):
        def log_profile(self, profile: Any, step: int) -> None:
            seen[step] = profile

    with mfumon.monitor(
        model, seq_len=8, log_every=3, warmup=0, profile_every=3, loggers=("wandb", Keep()), peak_tflops=0.5
    ) as mon:
        for _ in range(6):
            mon.step(tokens=train_step(model, opt))
    run = wandb_run(wandb_dir)
    refs = [  # the table reference, flattened by the reader: mfumon/profile/<field>
        (
            r["mfumon/profile_step"],
            {k.rpartition("/")[2]: v for k, v in r.items() if k.startswith("mfumon/profile/")},
        )
        for r in run["history"]
        if "mfumon/profile/path" in r
    ]
    assert [s for s, _ in refs] == sorted(seen) == [3, 6]
    step, ref = refs[-1]
    assert ref["_type"] == "table-file" and ref["ncols"] == len(PROFILE_COLUMNS)
    table = json.loads((run["dir"] / "files" / ref["path"]).read_text())
    assert table["columns"] == list(PROFILE_COLUMNS)
    expected = seen[step].sorted_rows()
    assert [row[0] for row in table["data"]] == [r.name for r in expected]
    for row, want in zip(table["data"], expected, strict=True):
        assert row[1] == pytest.approx(want.seconds) and row[2] == pytest.approx(want.flops)
