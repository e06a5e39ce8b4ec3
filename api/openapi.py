"""The OpenAPI 3.1 document of the whole HTTP API, from one table and the pydantic models.

:data:`OPERATIONS` has one row per route: method, path, summary, the request body's model
and the responses (with a model where one exists). The document is built from the rows and
the models' JSON schemas at run time, so it cannot drift from the validation the handlers
do; a test checks that every route of ``server.create_app`` has a row and every row a route,
another renders ``docs/api.md`` from the document and compares it with the file.

**Adding an endpoint**: add the route in ``server.create_app`` and one :class:`Operation`
row here (``starts_turn=True`` when it starts a turn: the fuzz test then sends it only
invalid bodies), then regenerate the page: ``python -m api.openapi --out docs/api.md``.

Served at ``GET /openapi.json`` (:func:`openapi_json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, TypeAdapter

from api.analytics import QueryRequest
from api.responses import ResponsesRequest
from api.seeds import ApiChatStreamRequest, ChatStreamRequest
from api.wire import ChatCompletionRequest, OrchestrateRequest
from api.ws import WsCancel, WsChat
from core.events import Event
from pipeline.roundtable import RoundtableRequest
from pipeline.sessions import Round

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "0.1.0"
COMPONENTS: Final = "#/components/schemas/"


# -- response shapes that have no model elsewhere ---------------------------------------
class ErrorDetail(BaseModel):
    """The ``error`` object of every 4xx/5xx answer (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "code", "param"}}``."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class Accepted(BaseModel):
    """``202``: a turn started with ``background: true`` runs on; follow ``events_url``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    conversation_id: str
    status: Literal["running"]
    events_url: str


# -- the table ----------------------------------------------------------------------------
ParamIn = Literal["path", "query", "header"]


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """A path, query or header parameter."""

    name: str
    where: ParamIn
    schema: Mapping[str, Any]
    description: str
    required: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One response: its media type and, for JSON, the model (or a plain schema)."""

    description: str
    media: str | None = "application/json"
    model: type[BaseModel] | None = None
    schema: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """One route of the HTTP API; ``path`` in OpenAPI's template form (``{request_id}``)."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    summary: str
    tag: str
    responses: Mapping[int, Reply]
    body: type[BaseModel] | None = None
    params: Sequence[Param] = ()
    starts_turn: bool = False
    admin: bool = False  # wants ``Authorization: Bearer <ADMIN_KEY>`` when ADMIN_KEY is set
    description: str = ""
    extensions: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def operation_id(self) -> str:
        words = [w for w in self.path.replace("{", "").replace("}", "").split("/") if w]
        name = "_".join(w.replace(".", "_").replace("-", "_") for w in words) or "index"
        return f"{self.method.lower()}_{name}"


def _sse(description: str) -> Reply:
    return Reply(description, media="text/event-stream", schema={"type": "string"})


def _json(description: str, model: type[BaseModel] | None = None) -> Reply:
    return Reply(description, model=model, schema=None if model else {"type": "object"})


REQUEST_ID = Param("request_id", "path", {"type": "string"}, "the request id (X-Request-Id)",
                   required=True)
RESPONSE_ID = Param("response_id", "path", {"type": "string"},
                    "the response id (resp_…, X-Response-Id)", required=True)
TRACE = Param("trace", "query", {"type": "string", "enum": ["true", "false", "1", "0"]},
              "also send the trace-only events (llm_call, route, memory)")
CURSOR = (
    Param("since_seq", "query", {"type": "integer", "minimum": 0},
          "every event with seq > N (0: everything)"),
    Param("Last-Event-ID", "header", {"type": "string", "pattern": "^[0-9]{1,18}$"},
          "the last seq seen; the larger of it and since_seq wins"),
)
AGENT_VIEW = (
    Param("max_depth", "query", {"type": "integer", "minimum": 0},
          "only streams this deep (0: the top level; sub-agents are deeper)"),
    Param("agents", "query", {"type": "string"},
          "only the streams of these agents (comma-separated names)"),
)
NATIVE_STREAM = ("Native SSE: `id: <seq>`, `event: <type>`, `data: <one-line JSON event>` "
                 "(the `Event` schema); see docs/protocol.md")

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation("POST", "/v1/orchestrate", "Run a turn and stream its native events", "native",
              body=OrchestrateRequest, starts_turn=True,
              responses={200: _sse(NATIVE_STREAM), 202: _json("background: true", Accepted)}),
    Operation("POST", "/v1/roundtable", "Run a roundtable of panelists in one native stream",
              "native", body=RoundtableRequest, starts_turn=True,
              responses={200: _sse(NATIVE_STREAM), 202: _json("background: true", Accepted)}),
    Operation("GET", "/v1/requests/{request_id}/events",
              "Replay a request's events after a cursor, then follow it live", "native",
              params=(REQUEST_ID, *CURSOR, TRACE, *AGENT_VIEW),
              responses={200: _sse(NATIVE_STREAM),
                         204: Reply("finished and fully seen: stop reconnecting", media=None)}),
    Operation("GET", "/v1/requests/{request_id}", "A request's status, messages, usage, timings",
              "native", params=(REQUEST_ID,), responses={200: _json("the round", Round)}),
    Operation("POST", "/v1/requests/{request_id}/cancel",
              "Stop a running turn, keeping its partial answer", "native", params=(REQUEST_ID,),
              responses={200: _json("cancelled, or why not (`worker`: who ran it; `via: "
                                    "owner` when another worker's turn was cancelled there)"),
                         503: _json("the owner worker could not be reached (issue 13)")}),
    Operation("POST", "/v1/chat/completions", "OpenAI-compatible chat completions", "openai",
              body=ChatCompletionRequest, starts_turn=True,
              responses={200: Reply("a `chat.completion`, or with `stream: true` `data:`-only "
                                    "SSE of `chat.completion.chunk` and `data: [DONE]`",
                                    schema={"type": "object"})}),
    Operation("POST", "/v1/responses", "OpenAI's Responses API on a durable turn", "openai",
              body=ResponsesRequest, starts_turn=True,
              responses={200: Reply("the `response` object, or with `stream: true` SSE of "
                                    "`event: <type>` / `data: <Responses event>` frames, each "
                                    "with a `sequence_number`", schema={"type": "object"})}),
    Operation("GET", "/v1/responses/{response_id}",
              "A response object; with stream=true its events after starting_after", "openai",
              params=(RESPONSE_ID,
                      Param("stream", "query", {"type": "string",
                                                "enum": ["true", "false", "1", "0"]},
                            "replay and follow the response's events"),
                      Param("starting_after", "query", {"type": "integer", "minimum": -1},
                            "every event with sequence_number > N (default: all)")),
              responses={200: Reply("the `response` object, or with `stream=true` its events "
                                    "as SSE", schema={"type": "object"})}),
    Operation("POST", "/v1/responses/{response_id}/cancel",
              "Stop a background response, keeping its partial output", "openai",
              params=(RESPONSE_ID,),
              responses={200: _json("the `response` object"),
                         503: _json("the worker running it could not be reached (issue 13)")}),
    Operation("DELETE", "/v1/responses/{response_id}", "Forget a response", "openai",
              params=(RESPONSE_ID,),
              responses={200: _json("`{id, object: response.deleted, deleted: true}`"),
                         503: _json("the worker running it could not be reached (issue 13)")}),
    Operation("POST", "/chat/stream", "Seed 003's chat stream: token, tool_result, tool_error, "
              "error and end objects", "seeds", body=ChatStreamRequest, starts_turn=True,
              responses={200: _sse("`data:`-only SSE of seed 003's objects; "
                                   '`{"type":"end","reason":…}` last')}),
    Operation("POST", "/api/chat/stream", "Seed 001's chat stream: a Turn update per change",
              "seeds", body=ApiChatStreamRequest, starts_turn=True,
              responses={200: _sse("`data: <Turn JSON>` per update (`status`, `content` so "
                                   "far), the last `complete`, `error` or `cancelled`")}),
    Operation("GET", "/v1/models", "The models a turn may name (OpenAI's list)", "openai",
              responses={200: _json("`{object: list, data: [{id, object, created, owned_by}]}`")}),
    Operation("GET", "/v1/models/{model}", "One model (OpenAI's model object)", "openai",
              params=(Param("model", "path", {"type": "string"}, "a model id, e.g. `offline`",
                            required=True),),
              responses={200: _json("`{id, object: model, created, owned_by}`"),
                         404: _json("unknown model (`model_not_found`)")}),
    Operation("GET", "/v1/ws", "WebSocket: chat turns and their updates", "websocket",
              description="Upgrade to a WebSocket. Client messages: `WsChat` (starts a turn) "
                          "and `WsCancel`; the server sends `response_id`, `update` (a turn "
                          "update) and `complete` frames, and `error` frames for bad messages.",
              responses={101: Reply("switching protocols", media=None)},
              extensions={"x-websocket-client-messages": {
                  "oneOf": [{"$ref": f"{COMPONENTS}WsChat"}, {"$ref": f"{COMPONENTS}WsCancel"}],
                  "discriminator": {"propertyName": "type"}}}),
    Operation("POST", "/v1/query", "One read-only SQL statement over the event store", "analytics",
              body=QueryRequest, admin=True,
              responses={200: Reply("JSON `{columns, types, rows, row_count, truncated, "
                                    "elapsed_ms}`, CSV or Parquet (`format` or `Accept`)",
                                    schema={"type": "object"})}),
    Operation("POST", "/v1/export", "Export what closed since the last run to Parquet now",
              "analytics", admin=True, responses={200: _json("the files written, the watermark")}),
    Operation("GET", "/v1/export", "Every file of the Parquet lake, and the watermark",
              "analytics", admin=True, responses={200: _json("the lake's manifest")}),
    Operation("GET", "/v1/export/files/{path}", "One Parquet file of the lake", "analytics",
              admin=True, params=(Param("path", "path", {"type": "string"},
                                        "a path from GET /v1/export", required=True),),
              responses={200: Reply("the file", media="application/vnd.apache.parquet",
                                    schema={"type": "string", "format": "binary"})}),
    Operation("GET", "/v1/tools", "Every tool, its parameters' JSON schema, whether it is on",
              "tools", responses={200: _json("the tools")}),
    Operation("GET", "/speech/providers", "Where the speech tools send audio", "tools",
              responses={200: _json("the providers")}),
    Operation("GET", "/healthz", "Liveness and the figures an operator looks at first", "ops",
              responses={200: _json("status, worker, pid, workers, live turns, clients, "
                                    "store, tools")}),
    Operation("GET", "/metrics", "Prometheus metrics (text format 0.0.4)", "ops",
              responses={200: Reply("the metrics", media="text/plain", schema={"type": "string"})}),
    Operation("GET", "/", "The roundtable viewer page", "ops",
              responses={200: Reply("HTML", media="text/html", schema={"type": "string"})}),
    Operation("GET", "/openapi.json", "This document", "ops",
              responses={200: _json("OpenAPI 3.1")}),
)
"""Every route of the API. Add a row with every route you add (see the module docstring)."""

#: Models in ``components.schemas`` beside those the table names (the stream's events,
#: the WebSocket's messages).
EXTRA_SCHEMAS: Final[dict[str, Any]] = {"Event": Event, "WsChat": WsChat, "WsCancel": WsCancel}


# -- the document -------------------------------------------------------------------------
def _models(operations: Iterable[Operation]) -> dict[str, Any]:
    found: dict[str, Any] = {"ErrorResponse": ErrorResponse}
    for op in operations:
        if op.body is not None:
            found[op.body.__name__] = op.body
        for reply in op.responses.values():
            if reply.model is not None:
                found[reply.model.__name__] = reply.model
    return {**found, **EXTRA_SCHEMAS}


def component_schemas(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Any]:
    """``components.schemas``: every model's JSON schema (validation mode), refs inside."""
    models = _models(operations)
    keyed, defs = TypeAdapter.json_schemas(
        [(name, "validation", TypeAdapter(kind)) for name, kind in models.items()],
        ref_template=COMPONENTS + "{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (name, _mode), schema in keyed.items():
        if schema.get("$ref") != COMPONENTS + name:  # a union (Event): not a def by itself
            schemas[name] = schema
    return dict(sorted(schemas.items()))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": COMPONENTS + model.__name__}


def _operation(op: Operation) -> dict[str, Any]:
    body: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                            "tags": [op.tag]}
    if op.description:
        body["description"] = op.description
    if op.params:
        body["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
             "description": p.description, "schema": dict(p.schema)} for p in op.params]
    if op.body is not None:
        body["requestBody"] = {"required": True,
                               "content": {"application/json": {"schema": _ref(op.body)}}}
    responses: dict[str, Any] = {}
    for status, reply in sorted(op.responses.items()):
        entry: dict[str, Any] = {"description": reply.description}
        if reply.media is not None:
            schema = _ref(reply.model) if reply.model is not None else dict(reply.schema or {})
            entry["content"] = {reply.media: {"schema": schema}}
        responses[str(status)] = entry
    error = {"content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    responses["4XX"] = {"description": "refused: bad input, unknown id or model, too large, "
                                       "or (with ADMIN_KEY) unauthorized", **error}
    responses["5XX"] = {"description": "the server failed or is unavailable", **error}
    body["responses"] = responses
    if op.admin:
        body["security"] = [{}, {"adminKey": []}]  # the key is wanted only when ADMIN_KEY is set
    if op.starts_turn:
        body["x-starts-turn"] = True
    body.update(op.extensions)
    return body


def build_document(operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (default: the whole API)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "agentflow", "version": API_VERSION,
                 "description": "Reactive pipeline for LLM agent event streams: native SSE, "
                                "OpenAI-compatible endpoints, durable replay, analysts' SQL. "
                                "Errors are `{\"error\": {message, type, code, param}}`; every "
                                "`*_ms` field is a whole number of milliseconds."},
        "servers": [{"url": "/"}],
        "tags": [{"name": tag} for tag in dict.fromkeys(op.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": component_schemas(operations),
            "securitySchemes": {"adminKey": {
                "type": "http", "scheme": "bearer",
                "description": "ADMIN_KEY, wanted by the analytics endpoints when it is set"}},
        },
    }


@functools.cache
def _document_bytes() -> bytes:
    return json.dumps(build_document(), separators=(",", ":")).encode()


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: this API's OpenAPI 3.1 document."""
    return web.Response(body=_document_bytes(), content_type="application/json")


def route_keys(app: web.Application) -> set[tuple[str, str]]:
    """``(method, path template)`` of every route of ``app`` (HEAD, added with GET, left out)."""
    keys: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if isinstance(path, str):
            keys.add((route.method, path))
    return keys


# -- the rendered page (docs/api.md) -------------------------------------------------------
def _type_of(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        name = str(schema["$ref"]).removeprefix(COMPONENTS)
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema or "oneOf" in schema:
        return " \\| ".join(_type_of(s) for s in schema.get("anyOf", schema.get("oneOf", [])))
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema and isinstance(
            schema["additionalProperties"], dict):
        return f"object of {_type_of(schema['additionalProperties'])}"
    return str(kind)


_LIMITS: Final = (("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"), ("minimum", "≥ {}"),
                  ("maximum", "≤ {}"), ("minItems", "at least {} items"),
                  ("maxItems", "at most {} items"), ("pattern", "matches `{}`"))


def _limits(schema: Mapping[str, Any]) -> str:
    parts = [text.format(schema[key]) for key, text in _LIMITS if key in schema]
    for branch in schema.get("anyOf", []):
        parts.extend(text.format(branch[key]) for key, text in _LIMITS if key in branch)
    return ", ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _fields(schema: Mapping[str, Any]) -> list[str]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    if not properties:
        return []
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | limits |", "| --- | --- | --- | --- | --- |"]
    for name, prop in properties.items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        lines.append(f"| `{name}` | {_type_of(prop)} | {'yes' if name in required else ''} | "
                     f"{default} | {_cell(_limits(prop))} |")
    return lines


def render_markdown(document: Mapping[str, Any]) -> str:
    """``docs/api.md``: the operations and the schemas of ``document``, as Markdown."""
    out = [
        "# HTTP API",
        "",
        "<!-- generated by `python -m api.openapi --out docs/api.md` from the OpenAPI document "
        "(GET /openapi.json); do not edit by hand -->",
        "",
        f"OpenAPI {document['openapi']}, served at `GET /openapi.json`. "
        + _cell(str(document["info"]["description"])),
        "",
        "| method | path | summary | request body | responses |",
        "| --- | --- | --- | --- | --- |",
    ]
    operations = [(method.upper(), path, op) for path, item in document["paths"].items()
                  for method, op in item.items()]
    for method, path, op in operations:
        request = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        body = _type_of(request["schema"]) if request else ""
        codes = ", ".join(code for code in op["responses"])
        out.append(f"| {method} | [`{path}`](#{op['operationId']}) | {_cell(op['summary'])} | "
                   f"{body} | {codes} |")
    out += ["", "## Operations", ""]
    for method, path, op in operations:
        out += [f"### {method} `{path}`", "", f'<a id="{op["operationId"]}"></a>', ""]
        out.append(_cell(op["summary"]) + ("." if not op["summary"].endswith(".") else ""))
        if op.get("description"):
            out += ["", _cell(op["description"])]
        request = op.get("requestBody", {}).get("content", {}).get("application/json")
        if request:
            out += ["", f"Body (`application/json`): {_type_of(request['schema'])}."]
        if op.get("x-starts-turn"):
            out += ["", "Starts a turn."]
        if op.get("security"):
            out += ["", "Wants `Authorization: Bearer <ADMIN_KEY>` when `ADMIN_KEY` is set."]
        if op.get("parameters"):
            out += ["", "| parameter | in | type | required | meaning |",
                    "| --- | --- | --- | --- | --- |"]
            out += [f"| `{p['name']}` | {p['in']} | {_type_of(p['schema'])} | "
                    f"{'yes' if p['required'] else ''} | {_cell(p['description'])} |"
                    for p in op["parameters"]]
        out += ["", "| status | content | meaning |", "| --- | --- | --- |"]
        for code, reply in op["responses"].items():
            content = reply.get("content", {})
            media = ", ".join(f"`{kind}` {_type_of(c['schema'])}".rstrip()
                              for kind, c in content.items())
            out.append(f"| {code} | {media} | {_cell(reply['description'])} |")
        out.append("")
    out += ["## Schemas", ""]
    for name, schema in document["components"]["schemas"].items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [_cell(str(schema["description"])), ""]
        if "oneOf" in schema:
            out += ["One of: " + ", ".join(_type_of(s) for s in schema["oneOf"])
                    + (f" (by `{schema['discriminator']['propertyName']}`)"
                       if "discriminator" in schema else "") + ".", ""]
        fields = _fields(schema)
        if fields:
            out += [*fields, ""]
        elif "enum" in schema:
            out += [f"One of {_type_of(schema)}.", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.openapi",
                                     description="Print or write the API's OpenAPI document.")
    parser.add_argument("--out", metavar="FILE", help="write docs/api.md (Markdown) or a .json file")
    args = parser.parse_args(argv)
    document = build_document()
    if args.out is None:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    out = Path(args.out)
    text = (json.dumps(document, indent=2) + "\n" if out.suffix == ".json"
            else render_markdown(document))
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
