"""Processes the tests start, each under a deadline: a hang fails its test, naming the deadline.

Two kinds: a command (`run`), whose whole process group is stopped at the deadline, and Python
processes started with `multiprocessing` (`spawn`, or a library that spawns them itself, such as
Lightning's ddp_spawn, under `deadline`), all killed at the deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import pytest
import torch.multiprocessing as mp

# The slowest process a test starts takes about 6 s on an idle 2-core machine (two gloo ranks, a
# torchrun of two HF Trainers). 120 s is 20x that, and it stays under pytest's per-test timeout
# (pyproject.toml) so that a hang fails here, with the process named, before pytest steps in.
PROC_TIMEOUT_S = 120.0
GRACE_S = 5.0  # after SIGTERM, before SIGKILL: time for torchrun to stop its own workers


def exit_now() -> NoReturn:
    """End a spawned worker here, after it wrote what the test reads, skipping interpreter teardown.

    With torch 2.13 on the CPU, a gloo process (DDP or not) that destroyed its process group can
    still abort as the interpreter exits ("terminate called without an active exception", SIGABRT),
    failing its test after the work is done: measured here, 2 of 16 runs of two DDP ranks without
    mfumon, 3 of 16 of tests/test_distributed.py on 0.1; 0 of 30 when the workers end with this.
    Call it last, and only on the success path, so a worker that raised still fails its test.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(
    args: Sequence[str], *, timeout_s: float = PROC_TIMEOUT_S, check: bool = False, **popen_kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; at `timeout_s` stop its process group and fail the test.

    The command gets its own session, so stopping it also stops what it started (torchrun's
    workers are stopped by torchrun on SIGTERM). `check` fails the test on a non-zero exit.
    """
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen_kw,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        pytest.fail(
            f"{_show(args)} did not finish within {timeout_s:g} s: stopped it and its process group\n"
            f"--- stdout (end) ---\n{out[-3000:]}\n--- stderr (end) ---\n{err[-3000:]}"
        )
    except BaseException:  # e.g. pytest-timeout's interrupt: leave no process behind
        _stop(proc)
        raise
    if check and proc.returncode != 0:
        pytest.fail(f"{_show(args)} exited with {proc.returncode}\n--- stderr (end) ---\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the process group, then SIGKILL it; whatever output could still be read."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()  # killed; a process that left the group may still hold the pipes open
    return "", ""


def _show(args: Sequence[str]) -> str:
    text = " ".join(str(a) for a in args)
    return f"`{text[:200]}{'...' if len(text) > 200 else ''}`"


@contextlib.contextmanager
def deadline(what: str, timeout_s: float = PROC_TIMEOUT_S) -> Iterator[None]:
    """Kill every `multiprocessing` child of this process still alive at `timeout_s`, and fail the test.

    For code that starts processes and joins them without a timeout (e.g. Lightning's ddp_spawn):
    the join then returns with the children's deaths, and the test fails naming `what` and the
    deadline. Children still alive when the block ends on an exception are killed too.
    """
    fired = threading.Event()

    def kill_all() -> None:  # on the timer's thread: only signals; the joining thread reaps them
        fired.set()
        for child in multiprocessing.active_children():
            child.kill()

    timer = threading.Timer(timeout_s, kill_all)
    timer.daemon = True
    timer.start()
    try:
        yield
    except BaseException as exc:
        timer.cancel()
        for child in multiprocessing.active_children():
            child.kill()
            child.join()
        if fired.is_set():
            raise pytest.fail.Exception(f"{what} did not finish within {timeout_s:g} s: killed") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():  # the block finished on its own, but only after the kill
        pytest.fail(f"{what} did not finish within {timeout_s:g} s: killed")


def spawn(
    fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, *, timeout_s: float = PROC_TIMEOUT_S
) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)`; fails the test if not all done by `timeout_s`.

    A rank that raises fails the test with its traceback, as with `spawn` itself.
    """
    with deadline(f"{nprocs} processes of {fn.__name__}", timeout_s):
        mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="spawn")
