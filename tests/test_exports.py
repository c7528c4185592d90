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


def test_public_names_stay_what_they_are_after_every_submodule_is_imported() -> None:
    # `import mfumon` is lazy: a submodule imported later binds its name on the package, so no
    # public name may share a submodule's name (mfumon.monitor once did: the function became a module).
    import importlib
    import pkgutil
    import types

    import mfumon

    for info in pkgutil.iter_modules(mfumon.__path__):
        if info.name not in ("__main__", "integrations"):
            importlib.import_module(f"mfumon.{info.name}")
    for name in mfumon.__all__:
        assert not isinstance(getattr(mfumon, name), types.ModuleType), name
    assert callable(mfumon.monitor) and mfumon.monitor.__module__ == "mfumon.monitoring"
