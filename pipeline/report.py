"""A self-contained report of the event store: an HTML page (charts inlined as PNG) or a PNG.

Sections: the key figures, latency (time to first token and duration), tokens over time
by model, tool failure rates, and roundtable panelists' share of the talk and time to
first token. Every figure comes from the documented views through one ``query`` function,
so the report reads the file (``--db``) or a running server (``--server``) the same way.
A section with no data says so.

matplotlib draws with its Agg canvas and no pyplot state, so reports can be built from
any thread and no display is needed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sinks.query import QueryResult, json_safe

QueryFn = Callable[[str], QueryResult]

PALETTE = ("#3b6fb6", "#e07b39", "#4a9d5b", "#c0504d", "#8064a2", "#4bacc6", "#9b8a3c", "#d16ba5")


@dataclasses.dataclass(slots=True)
class Section:
    """One part of the report: a title, a chart (or why there is none), a small table."""

    title: str
    note: str
    chart: bytes | None = None
    empty: str | None = None
    table: QueryResult | None = None


def _rows(query: QueryFn, sql: str) -> list[dict[str, Any]]:
    result = query(sql)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    return dt.datetime.fromisoformat(str(value).removesuffix("Z"))


def _num(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # the constrained layout fits it: one draw
    return buf.getvalue()


# -- data ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ReportData:
    summary: dict[str, Any]
    latency: list[dict[str, Any]]
    latency_quantiles: QueryResult
    tokens: list[dict[str, Any]]
    token_bucket: str
    tools: QueryResult
    shares: list[dict[str, Any]]
    panelists: QueryResult


def collect(query: QueryFn) -> ReportData:
    """Run the report's queries."""
    [summary] = _rows(query, """
        SELECT count(*) AS requests, count(DISTINCT conversation_id) AS conversations,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status <> 'completed' AND status <> 'running') AS failed,
               count(*) FILTER (WHERE status = 'running') AS running,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               min(started_at) AS first_request, max(started_at) AS last_request
        FROM requests""")
    latency = _rows(query, """
        SELECT first_token_ms, duration_ms FROM request_latency
        WHERE first_token_ms IS NOT NULL OR duration_ms IS NOT NULL
        ORDER BY started_at DESC LIMIT 5000""")
    quantiles = query("""
        SELECT 'time to first token' AS measure, count(first_token_ms) AS requests,
               round(quantile_cont(first_token_ms, 0.5), 1) AS p50_ms,
               round(quantile_cont(first_token_ms, 0.9), 1) AS p90_ms,
               round(quantile_cont(first_token_ms, 0.99), 1) AS p99_ms,
               round(max(first_token_ms), 1) AS max_ms
        FROM request_latency
        UNION ALL
        SELECT 'duration', count(duration_ms), round(quantile_cont(duration_ms, 0.5), 1),
               round(quantile_cont(duration_ms, 0.9), 1), round(quantile_cont(duration_ms, 0.99), 1),
               round(max(duration_ms), 1)
        FROM request_latency""")
    [span] = _rows(query, """
        SELECT date_diff('second', min(ts), max(ts)) AS seconds FROM events WHERE type = 'token_usage'""")
    seconds = span["seconds"] or 0
    bucket = "minute" if seconds < 6 * 3600 else "hour" if seconds < 4 * 86400 else "day"
    tokens = _rows(query, f"""
        SELECT date_trunc('{bucket}', ts) AS bucket, data->>'model' AS model,
               CAST(sum(CAST(data->>'total_tokens' AS BIGINT)) AS BIGINT) AS total_tokens
        FROM events WHERE type = 'token_usage'
        GROUP BY ALL ORDER BY bucket, model""")
    tools = query("""
        SELECT tool, calls, failed, unanswered, round(failure_rate, 3) AS failure_rate,
               round(p50_duration_ms, 1) AS p50_ms, round(p95_duration_ms, 1) AS p95_ms
        FROM tool_stats ORDER BY calls DESC, tool LIMIT 20""")
    shares = _rows(query, """
        WITH recent AS (
            SELECT request_id, min(started_at) AS started_at FROM panelist_stats
            GROUP BY request_id ORDER BY started_at DESC LIMIT 10
        )
        SELECT p.request_id, r.started_at, p.agent, p.share_of_talk,
               (SELECT m.content FROM messages m WHERE m.request_id = p.request_id
                  AND m.role = 'user' ORDER BY m.ordinal LIMIT 1) AS topic
        FROM panelist_stats p JOIN recent r USING (request_id)
        ORDER BY r.started_at, p.agent""")
    panelists = query("""
        SELECT agent, count(DISTINCT request_id) AS roundtables, sum(streams) AS streams,
               round(sum(chars) / nullif(sum(sum(chars)) OVER (), 0), 3) AS share_of_talk,
               round(avg(first_token_ms), 1) AS avg_first_token_ms
        FROM panelist_stats GROUP BY agent ORDER BY agent""")
    return ReportData(summary=summary, latency=latency, latency_quantiles=quantiles, tokens=tokens,
                      token_bucket=bucket, tools=tools, shares=shares, panelists=panelists)


# -- charts: each draws on one Axes and returns False when it has nothing to draw ------------


def draw_latency(ax: Axes, data: ReportData) -> bool:
    ttft = [v for r in data.latency if not math.isnan(v := _num(r["first_token_ms"]))]
    total = [v for r in data.latency if not math.isnan(v := _num(r["duration_ms"]))]
    if not total and not ttft:
        return False
    top = max(total + ttft)
    bins = [top * i / 30 for i in range(31)] if top > 0 else 10
    if total:
        ax.hist(total, bins=bins, color=PALETTE[0], alpha=0.75, label=f"duration (n={len(total)})")
    if ttft:
        ax.hist(ttft, bins=bins, color=PALETTE[1], alpha=0.75, label=f"time to first token (n={len(ttft)})")
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("requests")
    ax.set_title("Latency distribution")
    ax.legend(framealpha=0.9)
    return True


def draw_tokens(ax: Axes, data: ReportData) -> bool:
    if not data.tokens:
        return False
    models = sorted({str(r["model"]) for r in data.tokens})
    buckets = sorted({_as_datetime(r["bucket"]) for r in data.tokens})
    index = {b: i for i, b in enumerate(buckets)}
    bottom = [0.0] * len(buckets)
    width = 0.8
    for n, model in enumerate(models):
        heights = [0.0] * len(buckets)
        for r in data.tokens:
            if str(r["model"]) == model:
                heights[index[_as_datetime(r["bucket"])]] += _num(r["total_tokens"])
        ax.bar(range(len(buckets)), heights, width, bottom=bottom, label=model,
               color=PALETTE[n % len(PALETTE)])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    fmt = {"minute": "%H:%M", "hour": "%m-%d %H:00", "day": "%Y-%m-%d"}[data.token_bucket]
    step = max(1, len(buckets) // 12)
    ax.set_xticks(range(0, len(buckets), step),
                  [buckets[i].strftime(fmt) for i in range(0, len(buckets), step)],
                  rotation=30, ha="right")
    ax.set_ylabel("tokens (prompt + completion)")
    ax.set_title(f"Tokens per {data.token_bucket} by model (UTC)")
    ax.legend(frameon=False, fontsize="small")
    return True


def draw_tools(ax: Axes, data: ReportData) -> bool:
    rows = [dict(zip(data.tools.columns, r, strict=True)) for r in data.tools.rows]
    if not rows:
        return False
    rows.reverse()  # most called on top
    rates = [_num(r["failure_rate"]) * 100 if r["failure_rate"] is not None else 0.0 for r in rows]
    names = [str(r["tool"]) for r in rows]
    bars = ax.barh(names, rates, color=[PALETTE[3] if v > 0 else PALETTE[2] for v in rates])
    for bar, r in zip(bars, rows, strict=True):
        label = f" {r['failed']} of {r['calls'] - r['unanswered']} failed"
        if r["unanswered"]:
            label += f", {r['unanswered']} never answered"
        inside = bar.get_width() > 55  # a long bar: the label goes inside it, not past 100 %
        ax.annotate(label.strip() + " " if inside else label,
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                    ha="right" if inside else "left", color="white" if inside else "black",
                    fontsize="small")
    ax.set_xlim(0, 100)  # a rate: the axis ends at 100 %, and so do the bars
    ax.set_xlabel("failure rate (%)")
    ax.set_title("Tool failure rates")
    return True


def draw_shares(ax: Axes, data: ReportData) -> bool:
    if not data.shares:
        return False
    requests: list[str] = []
    for r in data.shares:
        if r["request_id"] not in requests:
            requests.append(str(r["request_id"]))
    agents = sorted({str(r["agent"]) for r in data.shares})
    left = [0.0] * len(requests)
    for n, agent in enumerate(agents):
        widths = [0.0] * len(requests)
        for r in data.shares:
            if r["agent"] == agent:
                widths[requests.index(str(r["request_id"]))] = _num(r["share_of_talk"]) * 100
        widths = [0.0 if math.isnan(w) else w for w in widths]
        ax.barh(range(len(requests)), widths, left=left, label=agent, color=PALETTE[n % len(PALETTE)])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(requests)), roundtable_labels(data.shares, requests), fontsize="small")
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the talk (% of characters)")
    ax.set_title("Roundtables: each panelist's share")
    ax.legend(frameon=False, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncol=min(len(agents), 6))
    return True


def roundtable_labels(shares: list[dict[str, Any]], requests: list[str], *,
                      width: int = 40) -> list[str]:
    """Each roundtable by its topic (its first user message), cut at ``width``; the same
    topic twice gets its start time; one without a topic its request id's tail."""
    first = {str(r["request_id"]): r for r in reversed(shares)}
    labels = []
    for request_id in requests:
        row = first[request_id]
        topic = " ".join(str(row.get("topic") or "").split())
        if not topic:
            labels.append(f"…{request_id[-12:]}")
            continue
        labels.append(topic if len(topic) <= width else topic[:width - 1].rstrip() + "…")
    counts = {label: labels.count(label) for label in labels}
    for i, request_id in enumerate(requests):
        if counts[labels[i]] > 1:
            started = first[request_id].get("started_at")
            when = _as_datetime(started).strftime("%m-%d %H:%M:%S") if started else request_id[-6:]
            labels[i] = f"{labels[i]} ({when})"
    return labels


def draw_panel_ttft(ax: Axes, data: ReportData) -> bool:
    rows = [dict(zip(data.panelists.columns, r, strict=True)) for r in data.panelists.rows]
    rows = [r for r in rows if r["avg_first_token_ms"] is not None]
    if not rows:
        return False
    ax.bar([str(r["agent"]) for r in rows], [_num(r["avg_first_token_ms"]) for r in rows],
           color=[PALETTE[n % len(PALETTE)] for n in range(len(rows))])
    ax.set_ylabel("milliseconds")
    ax.set_title("Panelists: average time to first token")
    return True


CHARTS: Sequence[tuple[str, Callable[[Axes, ReportData], bool], str]] = (
    ("Latency", draw_latency, "no finished requests yet"),
    ("Tokens over time", draw_tokens, "no token_usage events yet"),
    ("Tools", draw_tools, "no tool calls recorded yet"),
    ("Roundtables", draw_shares, "no roundtable (no stream at depth ≥ 1) recorded yet"),
    ("Panelists' time to first token", draw_panel_ttft, "no panelist produced text yet"),
)


def _chart(draw: Callable[[Axes, ReportData], bool], data: ReportData) -> bytes | None:
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="both", alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig) if draw(ax, data) else None


# -- output ---------------------------------------------------------------------------------


def sections(data: ReportData) -> list[Section]:
    notes = {
        "Latency": "From request_latency: time to first token (request received → first text) "
                   "and duration (the done event's), most recent 5000 requests.",
        "Tokens over time": "From tokens_by_model_day's source, the token_usage events: each "
                            "model call counts for the model that served it.",
        "Tools": "From tool_stats: failed results over results, per tool.",
        "Roundtables": "From panelist_stats: characters of text per panelist over the panel's, "
                       "for the ten most recent roundtables.",
        "Panelists' time to first token": "From panelist_stats: each panelist's stream start → "
                                          "its first text, averaged.",
    }
    tables = {"Latency": data.latency_quantiles, "Tools": data.tools,
              "Panelists' time to first token": data.panelists}
    out = []
    for title, draw, empty in CHARTS:
        chart = _chart(draw, data)
        out.append(Section(title=title, note=notes[title], chart=chart,
                           empty=None if chart else empty,
                           table=tables.get(title) if chart else None))
    return out


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:60rem;
color:#222;padding:0 1rem}h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}.meta,.note{color:#666;font-size:.9rem}
img{max-width:100%;height:auto}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.empty{padding:1rem;background:#f7f7f7;color:#555;
border-left:4px solid #bbb}.figures{display:flex;flex-wrap:wrap;gap:.8rem}.figure{background:#f4f7fb;
padding:.6rem 1rem;border-radius:6px;min-width:8rem}.figure b{display:block;font-size:1.3rem}
"""


def _html_table(result: QueryResult) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in result.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in result.rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    safe = json_safe(value)
    return "" if safe is None else str(safe)


def render_html(data: ReportData, *, source: str, generated: dt.datetime | None = None) -> str:
    """The report as one HTML page with every chart inlined (opens with no server)."""
    generated = generated or dt.datetime.now(dt.UTC)
    s = data.summary
    figures = [("requests", s["requests"]), ("conversations", s["conversations"]),
               ("completed", s["completed"]), ("failed or cancelled", s["failed"]),
               ("running", s["running"]), ("prompt tokens", s["prompt_tokens"]),
               ("completion tokens", s["completion_tokens"])]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Event store report</title><style>", _CSS, "</style></head><body>",
        "<h1>Event store report</h1>",
        f"<p class='meta'>Source {html.escape(source)} · generated "
        f"{generated.strftime('%Y-%m-%d %H:%M:%S')} UTC · requests from "
        f"{html.escape(_cell(s['first_request']) or '–')} to "
        f"{html.escape(_cell(s['last_request']) or '–')}</p>",
        "<div class='figures'>",
        *(f"<div class='figure'><b>{html.escape(_cell(v) or '0')}</b>{html.escape(k)}</div>"
          for k, v in figures),
        "</div>",
    ]
    for section in sections(data):
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.append(f"<p class='note'>{html.escape(section.note)}</p>")
        if section.chart is not None:
            encoded = base64.b64encode(section.chart).decode("ascii")
            parts.append(f"<img alt='{html.escape(section.title)} chart' "
                         f"src='data:image/png;base64,{encoded}'>")
        else:
            parts.append(f"<p class='empty'>No data: {html.escape(section.empty or '')}.</p>")
        if section.table is not None and section.table.rows:
            parts.append(_html_table(section.table))
    parts.append("</body></html>\n")
    return "".join(parts)


def render_png(data: ReportData) -> bytes:
    """Every chart on one PNG (a grid); empty charts say so in place."""
    fig = Figure(figsize=(14, 4.2 * math.ceil(len(CHARTS) / 2)), layout="constrained")
    for n, (title, draw, empty) in enumerate(CHARTS, start=1):
        ax = fig.add_subplot(math.ceil(len(CHARTS) / 2), 2, n)
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
        if not draw(ax, data):
            ax.set_title(title)
            ax.text(0.5, 0.5, f"No data: {empty}", ha="center", va="center", transform=ax.transAxes,
                    color="#666")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"Event store: {data.summary['requests']} requests, "
                 f"{data.summary['conversations']} conversations")
    return _png(fig)


def write_report(query: QueryFn, out: Path, *, source: str) -> Path:
    """Collect the data and write ``out``: ``.png`` gives one image, anything else HTML."""
    data = collect(query)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        out.write_bytes(render_png(data))
    else:
        out.write_text(render_html(data, source=source), encoding="utf-8")
    return out
