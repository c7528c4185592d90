"""The installed `mfumon` command and `python -m mfumon`, run as real processes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.procs import run
from tests.tiny_models import TINY_CONFIGS


def mfumon_script() -> str:
    """The console script pip installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("mfumon")
    found = str(beside) if beside.exists() else shutil.which("mfumon")
    if found is None:
        pytest.fail(f"no `mfumon` console script beside {sys.executable} or on PATH: pip install -e .")
    return found


def test_help_from_the_script_and_from_python_m() -> None:
    script = run([mfumon_script(), "--help"])
    module = run([sys.executable, "-m", "mfumon", "--help"])
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout.startswith("usage: mfumon ")
    assert "peak" in script.stdout and "estimate" in script.stdout
    assert module.stdout == script.stdout  # one parser behind both


def test_no_command_prints_help_and_exits_2() -> None:
    out = run([mfumon_script()])
    assert out.returncode == 2
    assert out.stdout.startswith("usage: mfumon ") and "Traceback" not in out.stderr


def test_peak_of_a_named_device() -> None:
    out = run([mfumon_script(), "peak", "--device-name", "NVIDIA H100 80GB HBM3", "--dtype", "bf16"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "device: NVIDIA H100 80GB HBM3"
    assert lines[-1].split() == ["bf16", "989.5"]  # datasheet: 1979 TFLOP/s with 2:4 sparsity, half dense


def test_unknown_dtype_exits_2_with_one_line() -> None:
    out = run([mfumon_script(), "peak", "--device-name", "NVIDIA H100 80GB HBM3", "--dtype", "fp7"])
    assert out.returncode == 2
    said = (out.stdout + out.stderr).strip().splitlines()  # peak prints it on stdout today
    assert len(said) == 1 and "fp7" in said[0], said  # one line, no traceback


@pytest.mark.transformers
def test_estimate_a_config_json(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **TINY_CONFIGS["llama"]}))
    out = run([mfumon_script(), "estimate", "--config", str(config), "--seq-len", "16"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("llama (LlamaForCausalLM) from ")
    hf_config = transformers.AutoConfig.for_model(**json.loads(config.read_text()))
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())  # every distinct tensor once, as torch holds them
    params_total = next(line for line in out.stdout.splitlines() if line.startswith("total "))  # 1st table
    assert params_total.split()[1] == f"{total:,}"


@pytest.mark.transformers
def test_estimate_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = run([mfumon_script(), "estimate", "--config", str(tmp_path / "missing.json"), "--seq-len", "16"])
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # no traceback
    assert lines[0].startswith("mfumon estimate: --config: cannot read ") and "missing.json" in lines[0]


def test_run_file_commands_never_import_torch(tmp_path: Path) -> None:
    # plot, report, compare and watch read JSONL: importing torch (seconds) would be their whole
    # start-up cost; `import mfumon` is lazy so they start at once.
    run_file = tmp_path / "r.jsonl"
    facts = {"device": "cpu", "peak_tflops": 1.0, "peak_dtype": "fp32", "warmup": 0, "log_every": 1}
    lines = [
        {"step": s, "time": float(s), "run": facts} if s == 1 else {"step": s, "time": float(s)}
        for s in (1, 2)
    ]
    for line in lines:
        line.update({"mfumon/mfu": 0.1, "mfumon/tokens_per_s": 100.0, "mfumon/step_time_ms": 10.0})
    run_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    commands = [
        ["compare", str(run_file), str(run_file)],
        ["watch", str(run_file), "--once"],
        ["report", str(run_file), "-o", str(tmp_path / "r.html")],
        ["plot", str(run_file), "-o", str(tmp_path / "r.png")],
    ]
    probe = (
        "import sys, json\nfrom mfumon.cli import main\n"
        "codes = [main(c) for c in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))"
    )
    out = run([sys.executable, "-c", probe, json.dumps(commands)])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0], "torch": False}
