"""Drawing for `mfumon report`: the HTML page, its tables and inline SVG charts, from `reporting.build`.

Everything is inline (no script, style sheet or font from the network); the data behind the page
is embedded as JSON in `<script type="application/json" id="mfumon-data">`.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

__all__ = ["fmt", "line_chart", "page", "roofline_chart", "waterfall_chart"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:62em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.absent{color:#777;font-style:italic}
svg{display:block;margin:.5em 0}.note{color:#555}"""


def fmt(value: Any, key: str = "") -> str:
    """A value as the page shows it: fractions of MFU-like keys in %, numbers to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        name = key.rsplit("/", 1)[-1]
        if name.startswith(("mfu", "hfu", "goodput")) or name.endswith("_frac"):
            return f"{value * 100:.3g}%"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(table_id: str, head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(
        "<tr>"
        + "".join(f'<td class="n">{_esc(c)}</td>' if i else f"<td>{_esc(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    heads = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return f'<table id="{table_id}"><tr>{heads}</tr>{cells}</table>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>'


def _absent(text: str) -> str:
    return f'<p class="absent">{_esc(text)}</p>'


def line_chart(
    title: str, series: dict[str, dict[str, list[float]]], width: int = 760, height: int = 220
) -> str:
    """An inline SVG of each series' values over steps (one polyline per key, a shared scale)."""
    left, right, top, bottom = 70, 10, 24, 26
    xs = [s for d in series.values() for s in d["steps"]]
    ys = [v for d in series.values() for v in d["values"]]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-12, y1 + abs(y1) * 0.1 + 1e-12
    sx = (width - left - right) / (x1 - x0)
    sy = (height - top - bottom) / (y1 - y0)
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    parts.append(f'<text x="{left}" y="15" font-weight="bold">{_esc(title)}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#bbb"/>'
    )
    for i, (key, data) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(
            f"{left + (s - x0) * sx:.1f},{height - bottom - (v - y0) * sy:.1f}"
            for s, v in zip(data["steps"], data["values"], strict=True)
        )
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{points}"/>')
        parts.append(f'<text x="{left + 200 + 170 * i}" y="15" fill="{color}">{_esc(key)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{_esc(fmt(y1))}</text>')
    parts.append(f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{_esc(fmt(y0))}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">step {x0:g}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 8}" text-anchor="end">step {x1:g}</text>')
    return "".join(parts) + "</svg>"


def waterfall_chart(wf: dict[str, Any], width: int = 760) -> str:
    """An inline SVG of the waterfall: a bar per row spanning the MFU it removes, on a 0-100% scale."""
    rows: list[tuple[str, float, float, str]] = [("peak", 0.0, 1.0, "#555")]
    level = 1.0
    for drop in wf["drops"]:
        rows.append((drop["name"], level - drop["points"], level, "#d62728"))
        level -= drop["points"]
    rest = wf["unexplained"]
    rows.append((rest["name"], min(level, wf["achieved"]), max(level, wf["achieved"]), "#aaa"))
    rows.append((wf["achieved_name"], 0.0, wf["achieved"], "#2ca02c"))
    label_w, bar_w, row_h = 300, width - 300 - 70, 22
    svg_h = row_h * len(rows) + 10
    parts = [f'<svg width="{width}" height="{svg_h}" role="img">']
    for i, (name, lo, hi, color) in enumerate(rows):
        y = 5 + i * row_h
        x = label_w + max(lo, 0.0) * bar_w
        w = max((min(hi, 1.0) - max(lo, 0.0)) * bar_w, 0.5)
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_esc(name)}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{color}"/>')
        parts.append(f'<text x="{label_w + bar_w + 4}" y="{y + 15}">{(hi - lo) * 100:.3g}%</text>')
    return "".join(parts) + "</svg>"


def roofline_chart(profile: dict[str, Any], width: int = 520, height: int = 300) -> str:
    """Log-log SVG: each profiled row at (FLOPs per byte, achieved TFLOP/s), under the roof when known."""
    points = []
    for row in profile.get("rows", []):
        flops, nbytes, seconds = (row.get(k) for k in ("flops", "bytes", "seconds"))
        if all(isinstance(v, (int, float)) and v > 0 for v in (flops, nbytes, seconds)):
            points.append((str(row.get("name", "?")), flops / nbytes, flops / seconds / 1e12))
    if not points:
        return _absent("No roofline: no profiled row has FLOPs, bytes and seconds.")
    peak, bandwidth = profile.get("peak_tflops"), profile.get("bandwidth_gbs")
    lx = [math.log10(p[1]) for p in points]
    ly = [math.log10(p[2]) for p in points] + ([math.log10(peak)] if peak else [])
    x0, x1, y0, y1 = min(lx) - 0.5, max(lx) + 0.5, min(ly) - 0.5, max(ly) + 0.5
    left, bottom = 50, 30

    def pos(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - 10)
        return px, height - bottom - (y - y0) / (y1 - y0) * (height - bottom - 10)

    parts = [f'<svg width="{width}" height="{height}" role="img">']
    if peak and bandwidth:
        top, slope = math.log10(peak), math.log10(bandwidth * 1e9 / 1e12)  # TFLOP/s per FLOP/byte
        roof = [pos(x, min(top, x + slope)) for x in (x0, x1)]
        knee = top - slope
        if x0 < knee < x1:
            roof.insert(1, pos(knee, top))
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in roof)
        parts.append(f'<polyline fill="none" stroke="#555" points="{line}"/>')
    for i, (name, x, y) in enumerate(points):
        cx, cy = pos(math.log10(x), math.log10(y))
        color = COLORS[i % len(COLORS)]
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{cx + 6:.1f}" y="{cy - 4:.1f}" fill="{color}">{_esc(name)}</text>')
    axes = "FLOPs/byte across, TFLOP/s up, both log scale"
    if not (peak and bandwidth):
        axes += "; no roof drawn: the profile carries no peak_tflops and bandwidth_gbs"
    parts.append(f'<text x="{left}" y="{height - 8}">{_esc(axes)}</text>')
    return "".join(parts) + "</svg>"


def page(data: dict[str, Any]) -> str:
    """The whole self-contained HTML page."""
    body = [f"<h1>mfumon report: {_esc(data['label'])}</h1>"]
    body.append(
        f'<p class="note">{_esc(data["path"])}: {data["windows"]:,} logged windows, '
        f"steps {data['first_step']} to {data['last_step']}.</p>"
    )
    body += [f'<p class="note">{_esc(n)}</p>' for n in data["notes"]]
    facts = _table("facts", ["fact", "value"], [[label, fmt(v)] for label, v in data["facts"]])
    comp = data["flops_by_component"]
    total = sum(comp.values()) - comp.get("recompute", 0)
    if comp:
        share = {k: f"{v / total * 100:.3g}%" if total and k != "recompute" else "" for k, v in comp.items()}
        rows = [[k, f"{v:,}", share[k]] for k, v in comp.items()]
        facts += "<h3>FLOPs per token by component (training: forward + backward)</h3>"
        facts += _table("flops-by-component", ["component", "FLOPs per token", "share"], rows)
    if not data["facts"]:
        facts = _absent("No run facts in this file (written before mfumon 0.2).")
    body.append(_section("run-facts", "The run", facts))
    summary = f'<p class="note">Source: {_esc(data["summary_source"])}.</p>'
    summary += _table("summary", ["key", "value"], [[k, fmt(v, k)] for k, v in data["summary"].items()])
    body.append(_section("whole-run", "Whole run", summary))
    body.append(_section("waterfall-section", "MFU waterfall", _waterfall(data["waterfall"])))
    charts = "".join(
        line_chart(title, {k: data["series"][k] for k in keys}) for title, keys in data["charts"] if keys
    )
    if data["decimated"]:
        charts = (
            f'<p class="note">Long run: each series is reduced to at most about {data["max_points"]:,} '
            "points (first, last, and each bucket's min and max), in the charts and in the embedded data.</p>"
            + charts
        )
    body.append(_section("charts", "Over the steps", charts or _absent("No chartable metric in this run.")))
    ledger = data["ledger"]
    body.append(
        _section(
            "ledger",
            "Where the time goes",
            _table("ledger-table", ["key", "whole run"], [[k, fmt(v, k)] for k, v in ledger.items()])
            if ledger
            else _absent("No time ledger in this run (goodput, input wait, per-rank step times not logged)."),
        )
    )
    body.append(_section("profile", "Latest step profile", _profile(data)))
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>mfumon report: {_esc(data['label'])}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + f'<script type="application/json" id="mfumon-data">{blob}</script></body></html>\n'
    )


def _waterfall(wf: dict[str, Any]) -> str:
    if "absent" in wf:
        return _absent(f"No waterfall: {wf['absent']}.")
    rows = [["peak (100%)", "", "100%", f"{wf['peak_tflops']:.4g} TFLOP/s per device"]]
    level = 1.0
    for d in wf["drops"]:
        level -= d["points"]
        rows.append([d["name"], f"-{d['points'] * 100:.4g}", f"{level * 100:.4g}%", d["measured_by"]])
    rest = wf["unexplained"]
    after = f"{wf['achieved'] * 100:.4g}%"
    rows.append([rest["name"], f"-{rest['points'] * 100:.4g}", after, "the remainder"])
    rows.append([wf["achieved_name"], "", f"{wf['achieved'] * 100:.4g}%", "logged"])
    rule = (
        '<p class="note">From 100% of the peak down to the achieved MFU. Each drop is a cause this run '
        "measured, taking its share of what is left; what no measurement explains is shown as such.</p>"
    )
    rule += "".join(f'<p class="note">Note: {_esc(n)}.</p>' for n in wf["notes"])
    head = ["step", "MFU points lost", "MFU after", "measured by"]
    return rule + waterfall_chart(wf) + _table("waterfall-table", head, rows)


def _profile(data: dict[str, Any]) -> str:
    profile = data["profile"]
    if not profile:
        return _absent("No step profile in this run (profile_every was not set).")
    rows = [r for r in profile.get("rows", []) if isinstance(r, dict)]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = _table("profile-table", cols, [[fmt(r.get(c), c) for c in cols] for r in rows])
    return f'<p class="note">Profiled at step {data["profile_step"]}.</p>' + table + roofline_chart(profile)
