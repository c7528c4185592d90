"""tests/procs.py: processes past their deadline are stopped, and the test fails naming the deadline."""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import pytest

from tests.procs import run, spawn


def _sleep_for_an_hour(rank: int) -> None:
    time.sleep(3600)


def _rank_1_raises(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 gave up")


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it has stopped running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_spawn_kills_every_rank_at_the_deadline() -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(pytest.fail.Exception, match=r"2 processes of _sleep_for_an_hour .* within 1 s"):
        spawn(_sleep_for_an_hour, (), nprocs=2, timeout_s=1)
    assert set(multiprocessing.active_children()) <= before  # both killed and reaped


def test_spawn_passes_on_a_rank_failure() -> None:
    with pytest.raises(Exception, match="rank 1 gave up"):  # torch's ProcessRaisedException
        spawn(_rank_1_raises, (), nprocs=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_stops_the_command_and_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "print('waiting', flush=True)\n"
        "time.sleep(3600)\n"
    )
    with pytest.raises(pytest.fail.Exception, match=r"did not finish within 2 s") as failed:
        run([sys.executable, "-c", code, str(pid_file)], timeout_s=2)
    assert "--- stdout (end) ---\nwaiting\n" in str(failed.value)  # the output up to the deadline
    grandchild = int(pid_file.read_text())
    # in the command's process group, it got the same signals; a signal lands asynchronously, so
    # give it a moment to stop (outside the group it would sleep for an hour)
    deadline = time.monotonic() + 10.0
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
