"""Sinks: the DuckDB event store, SSE framing, the Observable → async-iterator bridge."""
