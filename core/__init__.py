"""The vocabulary every layer shares: events, errors, settings and the turn's types.

Nothing here imports ``operators``, ``sinks``, ``pipeline`` or ``api``: the layers are
``core`` ← ``operators``, ``sinks`` ← ``pipeline`` (harnesses, orchestration) ← ``api``
(HTTP handlers by wire) ← ``server.py`` (the entry point).
"""
