"""Chunks and answers of the OpenAI wire validate against OpenAI's published schemas (the
subset in ``tests/openai_schema/chat_completions.json``, version noted there), and that
subset agrees with the ``openai`` SDK's own types field by field."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openai.types import Model
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall
from openai.types.completion_usage import CompletionUsage

import server
from core.config import Settings

SCHEMA: dict[str, Any] = json.loads(
    (Path(__file__).parent / "openai_schema" / "chat_completions.json").read_text())
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# Which SDK type mirrors which component of the spec.
MIRRORS: dict[str, type[pydantic.BaseModel]] = {
    "CreateChatCompletionResponse": ChatCompletion,
    "CreateChatCompletionStreamResponse": ChatCompletionChunk,
    "ChatCompletionResponseMessage": ChatCompletionMessage,
    "ChatCompletionMessageToolCall": ChatCompletionMessageFunctionToolCall,
    "ChatCompletionStreamResponseDelta": ChoiceDelta,
    "ChatCompletionMessageToolCallChunk": ChoiceDeltaToolCall,
    "ChatCompletionTokenLogprob": ChatCompletionTokenLogprob,
    "CompletionUsage": CompletionUsage,
    "Model": Model,
}


def validator(component: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**SCHEMA, "$ref": f"#/$defs/{component}"})


@pytest.mark.parametrize("component", sorted(MIRRORS))
def test_the_schema_subset_agrees_with_the_sdk_types(component: str) -> None:
    fields = MIRRORS[component].model_fields
    properties = SCHEMA["$defs"][component]["properties"]
    assert set(properties) <= set(fields), set(properties) - set(fields)
    # What the SDK requires, the spec requires too.
    required = {name for name, field in fields.items() if field.is_required()}
    assert required <= set(SCHEMA["$defs"][component].get("required", ())) | {"type"}
    assert set(Choice.model_fields) >= {"finish_reason", "index", "message", "logprobs"}


def test_the_schema_refuses_what_the_spec_refuses() -> None:
    answer = validator("CreateChatCompletionResponse")
    ok = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": None,
         "message": {"role": "assistant", "content": "hi", "refusal": None}}]}
    answer.validate(ok)
    without_refusal = json.loads(json.dumps(ok))
    del without_refusal["choices"][0]["message"]["refusal"]
    assert not answer.is_valid(without_refusal)
    assert not validator("CreateChatCompletionStreamResponse").is_valid({**ok, "object": "chat.completion"})


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "events.duckdb", offline_token_delay_ms=0, flush_interval_ms=20)))


VARIANTS: list[dict[str, Any]] = [
    {},
    {"tools": [WEATHER], "tool_choice": "required"},
    {"n": 2, "logprobs": True, "top_logprobs": 2},
    {"response_format": {"type": "json_object"}, "stop": "zzz", "seed": 3},
    {"max_tokens": 3},
]


@pytest.mark.parametrize("extra", VARIANTS)
async def test_answers_and_chunks_validate(client: TestClient, extra: dict[str, Any]) -> None:
    body = {"model": "offline", "messages": ASK, **extra}
    async with client.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    validator("CreateChatCompletionResponse").validate(answer)
    ChatCompletion.model_validate(answer)
    async with client.post("/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        raw = (await resp.read()).decode()
    frames = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert frames[-1] == "[DONE]"
    chunk_schema = validator("CreateChatCompletionStreamResponse")
    for frame in frames[:-1]:
        chunk_schema.validate(json.loads(frame))
    assert len(frames) > 3


async def test_models_and_errors_validate(client: TestClient) -> None:
    async with client.get("/v1/models") as resp:
        validator("ListModelsResponse").validate(await resp.json())
    async with client.get("/v1/models/offline") as resp:
        validator("Model").validate(await resp.json())
    async with client.get("/v1/models/nope") as resp:
        assert resp.status == 404
        validator("ErrorResponse").validate(await resp.json())
    async with client.post("/v1/chat/completions", json={"model": "offline", "messages": ASK,
                                                         "functions": []}) as resp:
        assert resp.status == 400
        validator("ErrorResponse").validate(await resp.json())
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="offline", messages=ASK, n=99)  # type: ignore[arg-type]
    assert caught.value.param == "n"
