"""`mfumon estimate`: counts and FLOPs table from a config.json, and clear errors on bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from mfumon.cli import estimate
from tests.procs import run
from tests.tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.transformers


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mfumon")
    estimate.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["estimate", *argv])


def _config(tmp_path: Path, model_type: str = "mixtral", **overrides: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **TINY_CONFIGS[model_type], **overrides}))
    return path


def test_prints_counts_and_breakdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    args = _parse("--config", str(_config(tmp_path)), "--seq-len", "16")
    assert args.func is estimate.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    d, V = 64, 128
    total = (
        2 * V * d + 2 * (d * 64 + 2 * d * 32 + 64 * d + 4 * 3 * d * 96 + 4 * d + 2 * d) + d
    )  # tiny mixtral
    assert f"{total:,}" in out  # 189,248
    assert f"{total - 2 * 4 * 3 * d * 96 // 2:,}" in out  # active: half the experts of 2 layers
    assert "2 layers, top-2 of 4 routed experts" in out
    for component in ("attn_proj", "attn_scores", "mlp", "router", "lm_head", "total"):
        assert component in out


def test_no_causal_is_a_default_the_model_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    config = str(_config(tmp_path, "llama"))
    per_layer_key = 6 * 4 * (16 + 16)
    assert estimate.run(_parse("--config", config, "--seq-len", "16")) == 0
    assert f"{2 * per_layer_key * 136 // 16:,}" in capsys.readouterr().out  # causal: 136 keys / 16 queries
    assert estimate.run(_parse("--config", config, "--seq-len", "16", "--no-causal")) == 0
    out = capsys.readouterr().out
    assert f"{2 * per_layer_key * 136 // 16:,}" in out  # LlamaAttention says is_causal: still causal
    assert f"{2 * per_layer_key * 16:,}" not in out  # not every key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"model_type": "no_such_model", "hidden_size": 8}', "model_type='no_such_model'"),
        ('{"hidden_size": 8}', "model_type=None"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(content)
    assert estimate.run(_parse("--config", str(path), "--seq-len", "16")) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_bad_seq_len_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    assert estimate.run(_parse("--config", str(tmp_path / "nope.json"), "--seq-len", "16")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert estimate.run(_parse("--config", str(_config(tmp_path, "llama")), "--seq-len", "0")) == 2
    assert "seq_len" in capsys.readouterr().err


def test_without_transformers_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` fail
        "from mfumon.cli.estimate import build_meta_model\n"
        "from mfumon.errors import MissingDependencyError\n"
        "try:\n    build_meta_model(sys.argv[1])\nexcept MissingDependencyError as e:\n    print(e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = run([sys.executable, "-c", code, str(tmp_path)], cwd=root, check=True)
    assert "pip install 'mfumon[transformers]'" in out.stdout
