from __future__ import annotations

import inspect
import sys

import mfumon
from tests.procs import run


def test_all_matches_the_exported_members() -> None:
    public = {
        name
        for name in dir(mfumon)
        if not name.startswith("_") and not inspect.ismodule(getattr(mfumon, name)) and name != "annotations"
    }
    assert set(mfumon.__all__) == public


def test_engine_imports_no_framework() -> None:
    code = (
        "import sys, mfumon, mfumon.cli; "
        "print(sorted({'lightning', 'pytorch_lightning', 'transformers', 'wandb', 'tensorboard'}"
        " & set(sys.modules)))"
    )
    out = run([sys.executable, "-c", code], check=True)
    assert out.stdout.strip() == "[]"
