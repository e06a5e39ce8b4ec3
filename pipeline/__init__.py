"""Agent-stream pipeline: events, harnesses, providers, orchestrator, config."""
