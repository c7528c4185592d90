"""`mfumon report`: a real run, and hand-written run files, to one self-contained HTML page.

No headless browser installs here (playwright needs a browser download), so the page is parsed
with the standard library's html.parser and its embedded data is checked against the JSONL.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mfumon
from mfumon import metrics as K
from mfumon.cli import main
from mfumon.reporting import decimate
from mfumon.runlog import read_run
from tests.tiny_models import HIDDEN, HandLM, token_batch

SEQ = 16


class Page(HTMLParser):
    """The parts of a page the tests look at: links, scripts, tables by id, section texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.urls: list[str] = []  # every src / href value
        self.scripts: list[dict[str, str | None]] = []
        self.data_json = ""
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: dict[str, str] = {}
        self.circles = 0
        self._table: str | None = None
        self._section: str | None = None
        self._in_data = False
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "script":
            self.scripts.append(a)
            self._in_data = a.get("id") == "mfumon-data"
        elif tag == "section":
            self._section = a.get("id")
            self.sections[self._section or ""] = ""
        elif tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "circle":
            self.circles += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "script":
            self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_json += data
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section] += data

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.data_json)


def rows(page: Page, table: str) -> dict[str, list[str]]:
    return {r[0]: r[1:] for r in page.tables[table][1:]}


def real_run(tmp_path: Path, steps: int = 12) -> Path:
    """A real monitor on a hand-written GPT (one block), host clock, a given peak."""
    torch.manual_seed(0)
    model = HandLM([nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = token_batch(2, SEQ)
    with mfumon.monitor(
        model, seq_len=SEQ, loggers=("jsonl",), log_dir=tmp_path, run_name="run", log_every=4, warmup=4,
        peak_tflops=989.5,
    ) as mon:  # fmt: skip
        for _ in range(steps):
            model(batch).sum().backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=batch.numel())
    return tmp_path / "run.jsonl"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_real_run_becomes_one_self_contained_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = real_run(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", str(path), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = Page(out.read_text())

    assert all(not u.startswith(("http:", "https:", "//")) for u in page.urls)  # nothing from the network
    assert "<link" not in out.read_text() and "@import" not in out.read_text()
    assert [s.get("type") for s in page.scripts] == ["application/json"]  # no code at all, only data

    written = lines(path)
    facts = written[0]["run"]
    keys = {k for r in written for k in r if k.startswith("mfumon/")}
    embedded = page.data["series"]
    assert set(embedded) == keys
    run = read_run(path)
    assert run.columns() == {k: run.series(k) for k in run.keys()}  # the one-pass read agrees with runlog
    for key in keys:
        assert embedded[key] == {"steps": [r["step"] for r in written], "values": [r[key] for r in written]}

    table = rows(page, "facts")
    assert table["model FLOPs per token (training)"] == [f"{facts['flops_per_token']:,}"]
    assert table["peak TFLOP/s per device (the MFU denominator)"] == ["989.5"]
    assert table["parameters, total"] == [f"{facts['params_total']:,}"]
    by_component = rows(page, "flops-by-component")
    assert {k: int(v[0].replace(",", "")) for k, v in by_component.items()} == facts["flops_by_component"]
    assert by_component["mlp"][0] == f"{6 * (2 * HIDDEN * 4 * HIDDEN):,}"  # 6 x the MLP's weights

    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert "run.summary.json" in page.sections["whole-run"]
    # The waterfall: input wait, then paused time (1 - goodput), each a share of what is left, then
    # the unexplained rest down to the MFU over wall time; by hand from the summary:
    wait, goodput, achieved = (summary[k] for k in (K.INPUT_WAIT_FRAC, K.GOODPUT, K.MFU_WALL))
    wf = page.data["waterfall"]
    assert [d["name"] for d in wf["drops"]] == ["input wait", "paused time and gaps (1 - goodput)"]
    assert [d["points"] for d in wf["drops"]] == pytest.approx([wait, (1 - wait) * (1 - goodput)])
    assert wf["achieved"] == achieved
    rest = (1 - wait) * goodput - achieved
    assert wf["unexplained"] == {"name": "not explained by any measurement", "points": pytest.approx(rest)}
    assert rows(page, "waterfall-table")["achieved MFU over wall time"][1] == f"{achieved * 100:.4g}%"

    ledger = rows(page, "ledger-table")  # the whole run's, from the summary
    assert set(ledger) == {K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC}
    assert ledger[K.INPUT_WAIT_FRAC] == [f"{summary[K.INPUT_WAIT_FRAC] * 100:.3g}%"]
    assert "time ledger" in page.sections["charts"] and "tokens/s" in page.sections["charts"]
    assert "No step profile in this run" in page.sections["profile"] and "profile-table" not in page.tables


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


LEDGER_RUN = [
    {
        "step": 10, "time": 1.0, "peak_dtype": "bf16", "device": "cuda",
        "mfumon/mfu": 0.46, "mfumon/mfu_avg": 0.46, "mfumon/peak_tflops": 100.0, "mfumon/goodput": 0.9,
        "mfumon/mfu_wall": 0.40, "mfumon/input_wait_frac": 0.1, "mfumon/step_time_max_ms": 100.0,
        "mfumon/step_time_min_ms": 90.0, "mfumon/step_time_ms": 100.0,
        "run": {"device": "cuda", "peak_tflops": 100.0, "peak_dtype": "bf16", "measured_peak_tflops": 80.0},
    },
    {"step": 20, "profile": {"seconds": 1.0, "rows": [
        {"name": "attention core", "flops": 2e12, "bytes": 1e10, "seconds": 0.4, "time_lost": 0.25},
        {"name": "mlp", "flops": 6e12, "bytes": 1e10, "seconds": 0.6, "time_lost": 0.0},
    ]}},
    {
        "step": 20, "time": 2.0, "peak_dtype": "bf16", "device": "cuda",
        "mfumon/mfu": 0.47, "mfumon/mfu_avg": 0.465, "mfumon/peak_tflops": 100.0, "mfumon/goodput": 0.9,
        "mfumon/mfu_wall": 0.42, "mfumon/input_wait_frac": 0.1, "mfumon/step_time_max_ms": 100.0,
        "mfumon/step_time_min_ms": 90.0, "mfumon/step_time_ms": 100.0,
    },
]  # fmt: skip


def test_measured_causes_each_take_their_drop(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ledger.jsonl", LEDGER_RUN)
    assert mfumon.report(path, tmp_path / "r.html") == tmp_path / "r.html"
    page = Page((tmp_path / "r.html").read_text())
    wf = page.data["waterfall"]
    # By hand, each cause takes its share of what is left:
    # ceiling 1 - 80/100 = 0.2 -> 0.8; attention core 0.25 s of 1 s: 0.8 x 0.25 = 0.2 -> 0.6;
    # input wait 0.6 x 0.1 = 0.06 -> 0.54; slowest rank 1 - 90/100 = 0.1: 0.054 -> 0.486;
    # paused 1 - 0.9 = 0.1: 0.0486 -> 0.4374; achieved over wall time: 0.40 and 0.42 over equal wall
    # times (10 steps x 100 ms / 0.9 each) = 0.41;
    # unexplained 0.4374 - 0.41 = 0.0274.
    expected = [0.2, 0.2, 0.06, 0.054, 0.0486]
    assert [d["points"] for d in wf["drops"]] == pytest.approx(expected)
    assert [d["name"] for d in wf["drops"]] == [
        "GEMM ceiling (measured)",
        "attention core: time lost (step profile)",
        "input wait",
        "slowest rank's lead",
        "paused time and gaps (1 - goodput)",
    ]
    assert wf["achieved"] == pytest.approx(0.41) and wf["achieved_name"] == "achieved MFU over wall time"
    assert wf["unexplained"]["points"] == pytest.approx(0.0274)
    assert 1.0 - sum(expected) - 0.0274 == pytest.approx(0.41)
    assert len(page.tables["waterfall-table"]) == 1 + 1 + 5 + 2  # head, peak, drops, remainder, achieved

    assert "computed from 2 windows (no summary.json" in page.sections["whole-run"]
    assert rows(page, "summary")["mfumon/mfu_avg"] == ["46.5%"]  # the last window's, not a mean
    assert rows(page, "summary")["mfumon/goodput"] == ["90%"]
    ledger = rows(page, "ledger-table")
    assert ledger["mfumon/goodput"] == ["90%"] and ledger["mfumon/input_wait_frac"] == ["10%"]
    assert ledger["mfumon/step_time_min_ms"] == ["90"]
    assert rows(page, "profile-table")["attention core"][2] == "0.4"  # its seconds
    assert page.circles == 2  # one roofline point per profiled row
    assert "time ledger: goodput and input wait" in page.sections["charts"]
    assert "Profiled at step 20" in page.sections["profile"]


def test_measurements_that_overlap_say_so_instead_of_hiding(tmp_path: Path) -> None:
    record = {"step": 5, "mfumon/mfu": 0.5, "mfumon/peak_tflops": 10.0, "mfumon/input_wait_frac": 0.6}
    path = write_jsonl(tmp_path / "o.jsonl", [record])
    page = Page(mfumon.report(path, tmp_path / "o.html").read_text())
    wf = page.data["waterfall"]
    assert wf["drops"][0]["points"] == pytest.approx(0.6)  # leaves 0.4, below the achieved 0.5
    assert wf["unexplained"]["points"] == pytest.approx(-0.1)
    assert "overlap" in wf["unexplained"]["name"]


def test_a_ceiling_above_the_peak_is_no_drop_and_says_so(tmp_path: Path) -> None:
    record = {"step": 5, "mfumon/mfu": 0.5, "run": {"peak_tflops": 10.0, "measured_peak_tflops": 11.0}}
    page = Page(mfumon.report(write_jsonl(tmp_path / "c.jsonl", [record]), tmp_path / "c.html").read_text())
    assert page.data["waterfall"]["drops"] == []
    assert "ceiling (11 TFLOP/s) is not below the peak" in page.sections["waterfall-section"]


def test_no_peak_no_waterfall(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"step": 5, "mfumon/tokens_per_s": 1000.0}])
    page = Page(mfumon.report(path, tmp_path / "n.html").read_text())
    assert "No waterfall: no peak known" in page.sections["waterfall-section"]
    assert "waterfall-table" not in page.tables
    assert "No run facts in this file" in page.sections["run-facts"]


def test_long_runs_are_reduced_keeping_extremes(tmp_path: Path) -> None:
    steps = list(range(10_000))
    values = [float((s * 7919) % 1000) for s in steps]
    values[4321] = -5.0  # a single dip must survive
    small_steps, small_values = decimate(steps, values, 200)
    assert len(small_steps) <= 200 and small_steps == sorted(small_steps)
    assert small_steps[0] == 0 and small_steps[-1] == 9_999
    assert min(small_values) == -5.0 and max(small_values) == 999.0
    assert decimate([1, 2], [3.0, 4.0], 200) == ([1, 2], [3.0, 4.0])

    path = write_jsonl(
        tmp_path / "long.jsonl",
        [{"step": s, "mfumon/mfu": v / 1e4} for s, v in zip(steps, values, strict=True)],
    )
    page = Page(mfumon.report(path, tmp_path / "long.html").read_text())
    assert page.data["decimated"] is True and "reduced to at most about" in page.sections["charts"]
    embedded = page.data["series"]["mfumon/mfu"]
    assert len(embedded["steps"]) <= page.data["max_points"] and min(embedded["values"]) == -5e-4


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("", "no logged window yet"), ("hello\nworld\n", "not JSON")],
)
def test_bad_run_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mfumon: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


def test_a_cut_off_last_line_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "cut.jsonl", LEDGER_RUN)
    path.write_text(path.read_text() + '{"step": 30, "mfumon/mf')
    assert main(["report", str(path)]) == 0  # default output: cut.html beside it
    assert "skipped its last line, cut off mid-write" in capsys.readouterr().err
    page = Page((tmp_path / "cut.html").read_text())
    assert page.data["last_step"] == 20


@pytest.mark.parametrize("where", ["a directory", "a missing folder"])
def test_an_unwritable_output_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", LEDGER_RUN)
    out = tmp_path if where == "a directory" else tmp_path / "no" / "such" / "r.html"
    assert main(["report", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mfumon: error: {out}: cannot be written") and err.count("\n") == 1


def test_a_real_profiled_run_shows_its_latest_profile_and_roofline(tmp_path: Path) -> None:
    """A real monitor with profile_every: the page's profile is the file's latest profile record."""
    torch.manual_seed(0)
    model = HandLM([nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = token_batch(2, SEQ)
    with mfumon.monitor(
        model, seq_len=SEQ, loggers=("jsonl",), log_dir=tmp_path, run_name="prof", log_every=4, warmup=2,
        peak_tflops=989.5, profile_every=5,
    ) as mon:  # fmt: skip
        for _ in range(12):
            model(batch).sum().backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=batch.numel())
    records = lines(tmp_path / "prof.jsonl")
    profiled = [r for r in records if "profile" in r]
    assert [r["step"] for r in profiled] == [5, 10]
    page = Page(mfumon.report(tmp_path / "prof.jsonl", tmp_path / "p.html").read_text())
    latest = profiled[-1]["profile"]
    assert page.data["profile"] == latest and page.data["profile_step"] == 10
    table = rows(page, "profile-table")
    assert set(table) == {r["name"] for r in latest["rows"]}
    drawn = [r for r in latest["rows"] if r.get("flops") and r.get("bytes") and r.get("seconds")]
    assert drawn and page.circles == len(drawn)  # one roofline point per row with FLOPs and bytes
    assert sum(r["flops"] for r in latest["rows"]) == pytest.approx(
        mon.flops_per_token * batch.numel(), rel=1e-9
    )  # the rows add up to the step's model FLOPs
