"""Both callbacks take their arguments from `CallbackOptions`, checked and fixed at construction."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytest.importorskip("lightning")
pytest.importorskip("transformers")
from mfumon.integrations import lightning, transformers  # noqa: E402
from mfumon.integrations._common import CallbackOptions  # noqa: E402


def test_both_callbacks_have_the_signature_of_the_options() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(CallbackOptions)}
    for callback in (lightning.MFUCallback, transformers.MFUCallback):
        params = inspect.signature(callback).parameters
        assert {name: p.default for name, p in params.items()} == fields
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


@pytest.mark.parametrize("callback", [lightning.MFUCallback, transformers.MFUCallback])
def test_arguments_are_fixed_after_construction(callback: type) -> None:
    cb = callback(seq_len=64, loggers="stdout")
    assert cb.options.seq_len == 64 and cb.loggers == ("stdout",)
    with pytest.raises(dataclasses.FrozenInstanceError, match="seq_len"):
        cb.seq_len = 0
    cb.note = "other attributes stay free"  # only the checked arguments are fixed
