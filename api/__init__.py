"""The HTTP API, one module per wire: ``native`` (orchestrate, roundtable, requests),
``openai`` (chat completions, models), ``ws`` (the WebSocket), ``analytics`` (query,
export), ``ops`` (health, tools, viewer); ``common`` holds what they share."""
