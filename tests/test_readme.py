"""The README stays true: its metric table matches the code, its commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from mfumon.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_metric_table_matches_the_keys_in_code() -> None:
    rows = dict(re.findall(r"^\| `(mfumon/[a-z_]+)` \| (.+) \|$", README, flags=re.M))
    assert rows == METRIC_KEYS


def test_ci_runs_exactly_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", README, flags=re.S)
    assert block is not None
    extracted = subprocess.run(
        [
            "awk",
            r"/<!-- test-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}",
            "README.md",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == block.group(1).strip()
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in extracted and "pip install" in extracted


def test_example_command_runs_the_main_example() -> None:
    block = re.search(r"<!-- example-command -->\n```bash\n(.+?)\n```", README, flags=re.S)
    assert block is not None and "python examples/train_tiny_gpt.py" in block.group(1)
