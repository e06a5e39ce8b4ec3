"""Harnesses and orchestration: providers, tools, the orchestrator, sessions, the
roundtable, and the analysts' CLI. Imports ``core``, ``operators`` and ``sinks``; never ``api``."""
