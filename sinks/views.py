"""Views that answer analysts' usual questions, defined over ``events``, ``requests``, ``messages``.

Every view is computed from the tables at query time (nothing is stored twice), so it is
right for turns recorded before the view existed, and it works the same over the Parquet
lake once ``events``, ``requests`` and ``messages`` name the lake's files (see
``docs/analysts.md``). Times are UTC; durations are whole milliseconds (``BIGINT``; averages
and quantiles of them are ``DOUBLE``).

=======================  =============================================================
view                     one row per
=======================  =============================================================
``request_latency``      request: time to first token, duration, status, tokens
``tokens_by_model_day``  model and UTC day (from ``token_usage`` events, so each
                         panelist's model counts for its own tokens)
``costs_by_model_day``  UTC day, provider and model: requests, tokens and ``cost_usd`` (from
                         ``token_usage`` events: sub-agents, panelists, router, advisor,
                         tool rounds each by their own model; ``provider`` is NULL for a
                         bare model id, i.e. the default provider)
``tool_calls``           tool execution: its ``tool_call`` joined to its ``tool_result``
``tool_stats``           tool: calls, failures, failure rate, latency
``conversation_stats``   conversation: turns, messages, tokens, first and last activity
``panelist_streams``     stream at depth ≥ 1 (roundtable panelists, sub-agents)
``panelist_stats``       request and panelist: share of the talk, time to first token
=======================  =============================================================

``create_views(con)`` runs :data:`VIEWS_SQL` (idempotent: ``CREATE OR REPLACE``);
``create_views(con, temp=True)`` makes them as temporary views, for a connection that
opened the file read-only.
"""

from __future__ import annotations

from typing import Final

import duckdb

VIEWS: Final[dict[str, str]] = {
    "request_latency": """
WITH marks AS (
    SELECT request_id,
           min(ts) FILTER (WHERE type = 'request_received')                   AS received_at,
           min(ts) FILTER (WHERE type = 'text')                               AS first_text_at,
           max(ts) FILTER (WHERE type = 'done')                               AS done_at,
           max(CAST(round(CAST(data->>'duration_ms' AS DOUBLE)) AS BIGINT))
               FILTER (WHERE type = 'done')                                   AS done_duration_ms,
           count(*) FILTER (WHERE type = 'text')                              AS text_events,
           count(*) FILTER (WHERE type = 'turn_error')                        AS errors,
           count(*)                                                           AS events
    FROM events
    GROUP BY request_id
)
SELECT m.request_id,
       r.conversation_id,
       r.kind,
       r.model,
       coalesce(r.status, CASE WHEN m.done_at IS NULL THEN 'running' END) AS status,
       coalesce(r.started_at, m.received_at)                                  AS started_at,
       CAST(round(date_diff('microsecond', m.received_at, m.first_text_at) / 1000.0) AS BIGINT)
                                                                              AS first_token_ms,
       coalesce(m.done_duration_ms, r.duration_ms)                           AS duration_ms,
       m.text_events,
       r.prompt_tokens,
       r.completion_tokens,
       m.errors,
       m.events
FROM marks m LEFT JOIN requests r USING (request_id)""",
    "tokens_by_model_day": """
SELECT data->>'model'                                   AS model,
       CAST(ts AS DATE)                                 AS day,
       count(DISTINCT request_id)                       AS requests,
       count(*)                                         AS model_calls,
       CAST(sum(CAST(data->>'prompt_tokens' AS BIGINT)) AS BIGINT)     AS prompt_tokens,
       CAST(sum(CAST(data->>'completion_tokens' AS BIGINT)) AS BIGINT) AS completion_tokens,
       CAST(sum(CAST(data->>'total_tokens' AS BIGINT)) AS BIGINT)      AS total_tokens
FROM events
WHERE type = 'token_usage'
GROUP BY ALL""",
    "costs_by_model_day": """
WITH usage AS (
    SELECT request_id, CAST(ts AS DATE) AS day, data->>'model' AS id,
           CAST(data->>'prompt_tokens' AS BIGINT) AS prompt_tokens,
           CAST(data->>'completion_tokens' AS BIGINT) AS completion_tokens,
           TRY_CAST(data->>'cost_usd' AS DOUBLE) AS cost_usd
    FROM events
    WHERE type = 'token_usage'
)
SELECT day,
       CASE WHEN position('/' IN id) > 0 THEN split_part(id, '/', 1) END        AS provider,
       CASE WHEN position('/' IN id) > 0 THEN substr(id, position('/' IN id) + 1)
            ELSE id END                                                       AS model,
       count(DISTINCT request_id)                                             AS requests,
       CAST(sum(prompt_tokens) AS BIGINT)                                     AS prompt_tokens,
       CAST(sum(completion_tokens) AS BIGINT)                                 AS completion_tokens,
       sum(cost_usd)                                                          AS cost_usd
FROM usage
GROUP BY ALL""",
    "tool_calls": """
SELECT c.request_id,
       c.data->>'execution_id'                      AS execution_id,
       c.data->>'tool'                              AS tool,
       c.stream_id,
       c.agent,
       c.ts                                         AS called_at,
       r.ts                                         AS answered_at,
       CAST(r.data->>'ok' AS BOOLEAN)               AS ok,
       r.data->>'error'                             AS error,
       CAST(round(CAST(r.data->>'duration_ms' AS DOUBLE)) AS BIGINT) AS duration_ms
FROM events c
LEFT JOIN events r
       ON r.request_id = c.request_id AND r.type = 'tool_result'
      AND r.data->>'execution_id' = c.data->>'execution_id'
WHERE c.type = 'tool_call'""",
    "tool_stats": """
SELECT tool,
       count(*)                                             AS calls,
       count(ok)                                            AS results,
       count(*) FILTER (WHERE ok)                           AS succeeded,
       count(*) FILTER (WHERE NOT ok)                       AS failed,
       count(*) - count(ok)                                 AS unanswered,
       count(*) FILTER (WHERE NOT ok) / nullif(count(ok), 0) AS failure_rate,
       avg(duration_ms)                                     AS avg_duration_ms,
       quantile_cont(duration_ms, 0.5)                      AS p50_duration_ms,
       quantile_cont(duration_ms, 0.95)                     AS p95_duration_ms,
       max(called_at)                                       AS last_called_at
FROM tool_calls
GROUP BY tool""",
    "conversation_stats": """
WITH turns AS (
    SELECT conversation_id,
           count(*)                                               AS turns,
           count(*) FILTER (WHERE status = 'completed')           AS completed_turns,
           count(*) FILTER (WHERE status IN ('error', 'interrupted')) AS failed_turns,
           min(started_at)                                        AS first_at,
           max(coalesce(finished_at, started_at))                 AS last_at,
           CAST(sum(prompt_tokens) AS BIGINT)                     AS prompt_tokens,
           CAST(sum(completion_tokens) AS BIGINT)                 AS completion_tokens
    FROM requests
    GROUP BY conversation_id
), said AS (
    SELECT conversation_id,
           count(*)                                    AS messages,
           count(*) FILTER (WHERE role = 'user')       AS user_messages,
           count(*) FILTER (WHERE role = 'assistant')  AS assistant_messages
    FROM messages
    GROUP BY conversation_id
)
SELECT t.conversation_id, t.turns, t.completed_turns, t.failed_turns,
       coalesce(s.messages, 0)           AS messages,
       coalesce(s.user_messages, 0)      AS user_messages,
       coalesce(s.assistant_messages, 0) AS assistant_messages,
       t.prompt_tokens, t.completion_tokens, t.first_at, t.last_at
FROM turns t LEFT JOIN said s USING (conversation_id)""",
    "panelist_streams": """
WITH starts AS (
    SELECT request_id, stream_id, coalesce(agent, data->>'agent') AS agent,
           coalesce(depth, CAST(data->>'depth' AS INTEGER)) AS depth, ts AS started_at
    FROM events
    WHERE type = 'stream_start' AND coalesce(depth, CAST(data->>'depth' AS INTEGER)) >= 1
), said AS (
    SELECT request_id, stream_id, min(ts) AS first_text_at, count(*) AS text_events,
           CAST(sum(length(data->>'delta')) AS BIGINT) AS chars
    FROM events
    WHERE type = 'text'
    GROUP BY request_id, stream_id
), usage AS (
    SELECT request_id, stream_id,
           CAST(sum(CAST(data->>'completion_tokens' AS BIGINT)) AS BIGINT) AS completion_tokens
    FROM events
    WHERE type = 'token_usage'
    GROUP BY request_id, stream_id
), ends AS (
    SELECT request_id, stream_id, max(ts) AS ended_at, any_value(data->>'status') AS status
    FROM events
    WHERE type = 'stream_end'
    GROUP BY request_id, stream_id
)
SELECT s.request_id, s.stream_id, s.agent, s.depth, s.started_at, e.ended_at, e.status,
       CAST(round(date_diff('microsecond', s.started_at, t.first_text_at) / 1000.0) AS BIGINT)
                                   AS first_token_ms,
       coalesce(t.text_events, 0)  AS text_events,
       coalesce(t.chars, 0)        AS chars,
       u.completion_tokens
FROM starts s
LEFT JOIN said t USING (request_id, stream_id)
LEFT JOIN usage u USING (request_id, stream_id)
LEFT JOIN ends e USING (request_id, stream_id)""",
    "panelist_stats": """
SELECT request_id,
       agent,
       count(*)                                                          AS streams,
       min(started_at)                                                   AS started_at,
       CAST(sum(text_events) AS BIGINT)                                  AS text_events,
       CAST(sum(chars) AS BIGINT)                                        AS chars,
       sum(chars) / nullif(sum(sum(chars)) OVER (PARTITION BY request_id), 0) AS share_of_talk,
       CAST(sum(completion_tokens) AS BIGINT)                            AS completion_tokens,
       arg_min(first_token_ms, started_at)                               AS first_token_ms,
       avg(first_token_ms)                                               AS avg_first_token_ms
FROM panelist_streams
GROUP BY request_id, agent""",
}
"""View name → its ``SELECT``; the order is the order of creation (later views use earlier ones)."""


def view_sql(name: str, *, temp: bool = False) -> str:
    """The ``CREATE OR REPLACE [TEMP] VIEW`` statement of one view."""
    kind = "TEMP VIEW" if temp else "VIEW"
    return f"CREATE OR REPLACE {kind} {name} AS{VIEWS[name]};\n"


VIEWS_SQL: Final[str] = "".join(view_sql(name) for name in VIEWS)
"""Every view's ``CREATE OR REPLACE VIEW`` statement, in creation order."""


def create_views(con: duckdb.DuckDBPyConnection, *, temp: bool = False) -> None:
    """Create (or replace) every view on ``con``; ``temp=True`` for a read-only connection.

    Idempotent; run it whenever the store opens, so the views always match this code.
    """
    con.execute("".join(view_sql(name, temp=temp) for name in VIEWS))
