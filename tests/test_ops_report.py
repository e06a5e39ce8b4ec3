"""The report's fixes (issue 15): the tool failure axis ends at 100 %; roundtables are
labelled by their topic."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pipeline.report import collect, draw_shares, draw_tools, roundtable_labels
from sinks.query import run_query
from sinks.store import EventStore
from tests.analytics_data import DAY2, TurnBuilder, create_store_views, record, synthetic_turns


def roundtable(request_id: str, start: float, topic: str) -> TurnBuilder:
    return (TurnBuilder(request_id, f"conv_{request_id}", start, model="m-small", user=topic)
            .stream(0.001, 1, "moderator")
            .stream(0.010, 2, "alice", 1, parent=1).text(0.05, 2, "Yes.").end(0.06, 2)
            .stream(0.070, 3, "bob", 1, parent=1).text(0.08, 3, "No!").end(0.09, 3)
            .end(0.1, 1).done(0.11))


async def test_roundtables_by_topic_and_failure_axis_at_100_percent(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=20).open()
    try:
        create_store_views(store)
        always_fails = (TurnBuilder("req_t", "conv_t", DAY2 + 10, model="m-small")
                        .stream(0.01, 1, "assistant")
                        .tool(0.02, 1, "broken", ok=False, duration_ms=1.0)
                        .tool(0.03, 1, "broken", ok=False, duration_ms=1.0)
                        .end(0.05, 1).done(0.06))
        long_topic = "Should agents stream every single step of their reasoning to the user?"
        await record(store, [*synthetic_turns(), always_fails,
                             roundtable("req_rt2", DAY2 + 120, long_topic),
                             roundtable("req_rt3", DAY2 + 180, "debate")])
        data = collect(lambda sql: run_query(store._con, sql))  # type: ignore[arg-type]
    finally:
        store.close()
    requests = list(dict.fromkeys(str(r["request_id"]) for r in data.shares))
    assert requests == ["req_rt", "req_rt2", "req_rt3"]
    assert roundtable_labels(data.shares, requests) == [
        "debate (03-02 17:31:00)",
        "Should agents stream every single step…",
        "debate (03-02 17:33:00)",
    ]
    ax = Figure().add_subplot()
    assert draw_shares(ax, data)
    assert [t.get_text() for t in ax.get_yticklabels()] == roundtable_labels(data.shares, requests)
    ax = Figure().add_subplot()
    assert draw_tools(ax, data)
    assert ax.get_xlim() == (0.0, 100.0)
    widths = {t.get_text(): bar.get_width() for t, bar in zip(ax.get_yticklabels(), ax.patches,
                                                                strict=True)}
    assert widths["broken"] == 100.0


def test_a_roundtable_without_a_topic_keeps_its_id() -> None:
    shares = [{"request_id": "req_0123456789abcdef", "topic": None, "started_at": None}]
    assert roundtable_labels(shares, ["req_0123456789abcdef"]) == ["…456789abcdef"]
