"""The OpenAPI document (``api/openapi.py``) in-process: every route of ``create_app`` has
an operation and every operation a route; the document validates as OpenAPI 3.1; its
schemas are the handlers' own models (so answers match them); ``docs/api.md`` is current.
The live server is fuzzed from it in ``tests/test_api_e2e.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

import server
from api.openapi import (
    OPERATIONS,
    Accepted,
    ErrorResponse,
    Operation,
    Reply,
    build_document,
    render_markdown,
    route_keys,
)
from api.wire import ApiError, OrchestrateRequest
from core.config import Settings
from pipeline.sessions import Round

ROOT = Path(__file__).resolve().parents[1]
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


def test_every_route_has_an_operation_and_every_operation_a_route(tmp_path: Path) -> None:
    app = server.create_app(Settings(db_path=tmp_path / "events.duckdb"))
    routes = route_keys(app)
    table = {(op.method, op.path) for op in OPERATIONS}
    assert routes - table == set(), "routes without a row in api/openapi.py OPERATIONS"
    assert table - routes == set(), "rows of api/openapi.py OPERATIONS without a route"
    assert len(table) == len(OPERATIONS), "a (method, path) appears twice in OPERATIONS"
    assert ("GET", "/v1/export/files/{path}") in routes  # the regex route's template
    ids = [op.operation_id for op in OPERATIONS]
    assert len(set(ids)) == len(ids), ids


def test_the_checker_sees_a_route_without_a_row(tmp_path: Path) -> None:
    app = server.create_app(Settings(db_path=tmp_path / "events.duckdb"))

    async def extra(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/v1/undocumented/{thing}", extra)
    assert route_keys(app) - {(op.method, op.path) for op in OPERATIONS} == {
        ("POST", "/v1/undocumented/{thing}")}


def test_the_document_is_valid_openapi_31() -> None:
    document = build_document()
    validate(document)
    assert document["openapi"] == "3.1.0"
    ops = [op for item in document["paths"].values() for op in item.values()]
    assert len(ops) == len(OPERATIONS)
    assert sorted(op["operationId"] for op in ops if op.get("x-starts-turn")) == [
        "post_v1_chat_completions", "post_v1_orchestrate", "post_v1_responses",
        "post_v1_roundtable"]
    # A broken document is refused (the validator is not a no-op).
    broken = build_document()
    broken["paths"]["/v1/orchestrate"]["post"]["responses"] = {"200": {"content": {}}}
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_request_schemas_are_the_handlers_models() -> None:
    document = build_document()
    schemas = document["components"]["schemas"]
    body = document["paths"]["/v1/orchestrate"]["post"]["requestBody"]["content"]
    assert body == {"application/json": {"schema": {"$ref": "#/components/schemas/OrchestrateRequest"}}}
    fields = set(OrchestrateRequest.model_fields)
    assert set(schemas["OrchestrateRequest"]["properties"]) == fields
    assert schemas["OrchestrateRequest"]["additionalProperties"] is False
    assert "turn_error" in schemas["Event"]["discriminator"]["mapping"]
    assert schemas["Done"]["properties"]["duration_ms"]["type"] == "integer"
    validator = _validator(document, "OrchestrateRequest")
    validator.validate({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": "x"}], "extra": 1},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


def _validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator of ``components.schemas[name]`` resolving refs within the document."""
    root = {**document, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root)


async def test_answers_match_their_documented_schemas(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    document = build_document()
    client = await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "events.duckdb", offline_token_delay_ms=1, flush_interval_ms=20)))
    body = {"messages": [{"role": "user", "content": "Hi"}], "background": True}
    accepted = await client.post("/v1/orchestrate", json=body)
    assert accepted.status == 202
    answer = await accepted.json()
    _validator(document, "Accepted").validate(answer)
    Accepted.model_validate(answer)
    refused = await client.post("/v1/orchestrate", json={"messages": []})
    assert refused.status == 400
    _validator(document, "ErrorResponse").validate(await refused.json())
    unknown = await client.get("/nowhere")
    _validator(document, "ErrorResponse").validate(await unknown.json())
    ErrorResponse.model_validate(ApiError(429, "slow down", code="rate_limited").body())
    request_id = answer["request_id"]
    async with client.get(f"/v1/requests/{request_id}/events") as events:
        await events.read()  # the turn is finished once its stream ends
    round_ = await (await client.get(f"/v1/requests/{request_id}")).json()
    _validator(document, "Round").validate(round_)
    Round.model_validate(round_)
    served = await (await client.get("/openapi.json")).json()
    assert served == document


def test_a_new_row_appears_in_the_document() -> None:
    """What another engineer does to document a new endpoint: one row."""
    row = Operation("POST", "/v1/responses", "OpenAI Responses API", "openai",
                    body=OrchestrateRequest, starts_turn=True,
                    responses={200: Reply("a response", schema={"type": "object"})})
    document = build_document((*OPERATIONS, row))
    validate(document)
    op = document["paths"]["/v1/responses"]["post"]
    assert op["operationId"] == "post_v1_responses" and op["x-starts-turn"] is True
    assert set(op["responses"]) == {"200", "4XX", "5XX"}


def test_docs_api_md_is_current() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert page == render_markdown(build_document()), (
        "docs/api.md is stale: run python -m api.openapi --out docs/api.md")
    for op in OPERATIONS:
        assert f"### {op.method} `{op.path}`" in page
