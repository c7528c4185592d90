"""The HF Trainer tests without wandb and tensorboard: only the tests that need one skip."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from tests.procs import run

pytestmark = pytest.mark.transformers

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(__file__).with_name("test_transformers.py")
NEED_A_LOGGER = {  # test -> the package it reads back with
    "test_report_to_tensorboard_gets_the_keys": "tensorboard",
    "test_report_to_wandb_gets_the_keys": "wandb",
}
RUN_TOO = {"test_bad_arguments_raise_at_construction", "test_tokens_fn_reads_the_model_inputs"}

# Runs pytest in a fresh interpreter where `import wandb` and `import tensorboard` fail, and
# writes what it collected and each test's outcome (with a skip's reason) to argv[1].
RUNNER = """
import json, sys
for name in ("wandb", "tensorboard"):
    sys.modules[name] = None  # the import system now raises ImportError for them
import pytest

class Record:
    def __init__(self):
        self.collected, self.outcomes = [], {}
    def pytest_itemcollected(self, item):  # before -k deselects
        self.collected.append(item.name)
    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1]
        if report.skipped:
            self.outcomes[name] = ["skipped", str(report.longrepr[2])]
        elif report.failed or report.when == "call":
            self.outcomes.setdefault(name, [report.outcome, str(report.longrepr)[-2000:]])

rec = Record()
code = pytest.main(["-q", "-p", "no:cacheprovider", "-k", sys.argv[3], sys.argv[2]], plugins=[rec])
with open(sys.argv[1], "w") as f:
    json.dump({"exit": int(code), "collected": rec.collected, "outcomes": rec.outcomes}, f)
"""


def test_without_wandb_and_tensorboard_only_their_tests_skip(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tree = ast.parse(TARGET.read_text())
    every_test = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert set(NEED_A_LOGGER) | RUN_TOO <= set(every_test)  # the names below still exist
    selected = sorted(set(NEED_A_LOGGER) | RUN_TOO)
    result_file = tmp_path / "result.json"
    proc = run([sys.executable, "-c", RUNNER, str(result_file), str(TARGET), " or ".join(selected)], cwd=ROOT)
    assert result_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["collected"] == every_test  # the module loads: it did not skip as a whole
    outcomes = result["outcomes"]
    assert sorted(outcomes) == selected
    for name, package in NEED_A_LOGGER.items():
        status, reason = outcomes[name]
        assert status == "skipped" and package in reason, (name, outcomes[name])
    for name in RUN_TOO:
        assert outcomes[name][0] == "passed", (name, outcomes[name])
    assert result["exit"] == 0
