"""The lean upstream read (issue 12): :class:`SSEDecoder` and :class:`ChunkReader` against the
SDK's own model, and the direct body read through the SDK's aiohttp transport."""

from __future__ import annotations

import gzip
import json
import random
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk

from pipeline.providers import (
    ChunkReader,
    Delta,
    Finish,
    OpenAIProvider,
    Piece,
    SSEDecoder,
    StreamFailure,
    ToolCallPiece,
    ToolCallRequest,
    Usage,
    _body_reader,
)
from tests.test_providers import MESSAGES, MODEL, pieces_of, provider_for, tiny_server


# -- the SDK's reading, as the provider did it before the lean read: the reference -------------
def reference_pieces(payloads: list[Any], *, model: str = "m") -> list[Piece]:
    """Pieces of ``payloads`` through ``ChatCompletionChunk.model_validate`` (raises what the
    SDK's model raises)."""
    pieces: list[Piece] = []
    calls: dict[int, dict[int, list[str]]] = {}
    for body in payloads:
        chunk = ChatCompletionChunk.model_validate(body)
        for choice in chunk.choices:
            index = choice.index
            if choice.delta.content:
                logprobs = None
                if choice.logprobs is not None and choice.logprobs.content:
                    logprobs = [item.model_dump(mode="json") for item in choice.logprobs.content]
                pieces.append(Delta(choice.delta.content, index, logprobs))
            if choice.delta.refusal:
                pieces.append(Delta(choice.delta.refusal, index, refusal=True))
            for call in choice.delta.tool_calls or ():
                slot = calls.setdefault(index, {}).setdefault(call.index, ["", "", ""])
                slot[0] = slot[0] or call.id or ""
                name = call.function.name if call.function is not None else None
                fragment = (call.function.arguments if call.function is not None else None) or ""
                first = not slot[1]
                if call.function is not None:
                    slot[1] = slot[1] or name or ""
                    slot[2] += fragment
                pieces.append(ToolCallPiece(call_index=call.index, id=call.id if first else None,
                                            name=name if first else None, arguments=fragment,
                                            index=index))
            if choice.finish_reason:
                for i, (cid, name, args) in sorted(calls.pop(index, {}).items()):
                    pieces.append(ToolCallRequest(id=cid or f"call_{i}", name=name,
                                                  arguments_json=args, index=index))
                pieces.append(Finish(choice.finish_reason, index))
        if chunk.usage is not None:
            pieces.append(Usage(model=chunk.model or model,
                                prompt_tokens=chunk.usage.prompt_tokens,
                                completion_tokens=chunk.usage.completion_tokens,
                                total_tokens=chunk.usage.total_tokens))
    for index, pending in sorted(calls.items()):  # the stream ended without finish_reason
        for i, (cid, name, args) in sorted(pending.items()):
            pieces.append(ToolCallRequest(id=cid or f"call_{i}", name=name,
                                          arguments_json=args, index=index))
    return pieces


def lean_pieces(payloads: list[Any], *, splits: random.Random | None = None) -> list[Piece]:
    """Pieces of ``payloads`` through a :class:`ChunkReader`, the body cut at random bytes."""
    body = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    body += b"data: [DONE]\n\n"
    reader = ChunkReader(model="m", tool_call_pieces=True)
    pieces: list[Piece] = []
    cuts = sorted(splits.sample(range(1, len(body)), min(8, len(body) - 1))) if splits else []
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        pieces.extend(reader.feed(body[start:end]))
    assert reader.done
    return [*pieces, *reader.pending_calls()]


def outcome(read: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "pieces", read(*args, **kwargs)
    except pydantic.ValidationError as exc:
        return "refused", [error["loc"] for error in exc.errors()]


def chunk(choices: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": choices, **fields}


def random_chunk(rng: random.Random) -> dict[str, Any]:
    """A chunk as upstreams send them, now and then with a field of a lax or wrong type."""
    def maybe(value: Any, *odd: Any) -> Any:
        return rng.choice(odd) if odd and rng.random() < 0.08 else value

    choices = []
    for index in range(rng.choice([0, 1, 1, 1, 2])):
        delta: dict[str, Any] = {}
        if rng.random() < 0.7:
            delta["content"] = maybe(rng.choice(["a", "b c", "", "\u2028x", "é"]), 5, ["x"])
        if rng.random() < 0.1:
            delta["refusal"] = maybe("no", 1)
        if rng.random() < 0.2:
            delta["tool_calls"] = [{
                "index": maybe(rng.randrange(2), "1", 1.0, "x"),
                **({"id": maybe(f"call{rng.randrange(9)}", 3)} if rng.random() < 0.5 else {}),
                "function": maybe({"name": rng.choice(["f", None]),
                                   "arguments": rng.choice(['{"a', '": 1}', None])}, None, 7),
            }]
        choice: dict[str, Any] = {"index": maybe(index, str(index), float(index), "x"),
                                  "delta": maybe(delta, None, [])}
        choice["finish_reason"] = maybe(rng.choice([None, None, None, "stop", "length",
                                                    "tool_calls"]), "eos", 0)
        if rng.random() < 0.05:
            choice["logprobs"] = {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": []}]}
        choices.append(choice)
    fields: dict[str, Any] = {}
    if rng.random() < 0.1:
        fields["usage"] = {"prompt_tokens": maybe(3, "3", 3.5), "completion_tokens": 2,
                           "total_tokens": 5}
    body = chunk(choices, **fields)
    if rng.random() < 0.03:
        body["object"] = "chat.completion"
    if rng.random() < 0.03:
        body["created"] = "soon"
    return body


def test_the_lean_read_gives_what_the_sdk_model_gives_or_refuses_what_it_refuses() -> None:
    rng = random.Random(1207)
    kinds: dict[str, int] = {"pieces": 0, "refused": 0}
    for _ in range(1500):
        payloads = [random_chunk(rng) for _ in range(rng.randrange(1, 5))]
        expected = outcome(reference_pieces, payloads)
        got = outcome(lean_pieces, payloads, splits=rng)
        assert got == expected, payloads
        kinds[expected[0]] += 1
    # Both branches were exercised many times (a generator that never errs tests nothing).
    assert kinds["pieces"] > 300 and kinds["refused"] > 300, kinds


def test_a_lax_chunk_after_tool_fragments_is_not_read_twice() -> None:
    """The lean read gives up on choice 1 after it took choice 0's fragment: the fragment
    is taken once, through the SDK's model."""
    payloads = [
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}]},
            "finish_reason": None},
            {"index": "1", "delta": {"content": "x"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]),
    ]
    pieces = lean_pieces(payloads)
    assert pieces == reference_pieces(payloads)
    assert ToolCallRequest(id="c1", name="f", arguments_json='{"a": 1}') in pieces


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_lines_end_at_cr_lf_or_crlf_even_across_chunks(newline: bytes) -> None:
    body = (b": keep-alive" + newline + b"id: 7" + newline + b"event: chunk" + newline
            + b"data: {\"a\":" + newline + b"data:1}" + newline + newline
            + b"data: two" + newline + newline + b"data: unfinished")
    for cut in range(1, len(body)):
        decoder = SSEDecoder()
        events = [*decoder.feed(body[:cut]), *decoder.feed(body[cut:])]
        assert events == [(b"chunk", b'{"a":\n1}'), (b"", b"two")], cut


def test_unicode_line_separators_inside_json_do_not_cut_a_chunk() -> None:
    text = "a\u2028b\u2029c\u0085d\x0be\x0cf"
    raw = json.dumps(chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]),
                     ensure_ascii=False).encode()
    reader = ChunkReader(model="m")
    assert list(reader.feed(b"data: " + raw + b"\n\n")) == [Delta(text)]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    raw = json.dumps(chunk([{"index": 0, "delta": {"content": "AB"}, "finish_reason": None}]))
    reader = ChunkReader(model="m")
    pieces = list(reader.feed(b"data: " + raw.encode().replace(b"AB", b"A\xffB") + b"\n\n"))
    assert pieces == [Delta("A\ufffdB")]


def test_an_error_event_and_non_json_fail_loudly() -> None:
    reader = ChunkReader(model="m")
    with pytest.raises(StreamFailure, match="slow down"):
        list(reader.feed(b'event: error\ndata: {"message": "slow down"}\n\n'))
    with pytest.raises(json.JSONDecodeError):
        list(ChunkReader(model="m").feed(b"data: {not json}\n\n"))


def test_nothing_is_read_after_done() -> None:
    reader = ChunkReader(model="m")
    good = json.dumps(chunk([{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]))
    pieces = list(reader.feed(f"data: {good}\n\ndata: [DONE]\n\ndata: {good}\n\n".encode()))
    assert pieces == [Delta("x")] and reader.done and not reader.finished


# -- the body read through the SDK's transport --------------------------------------------------
def sse_body() -> bytes:
    frames = [chunk([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
              for word in ("one ", "two")]
    frames.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    return b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + \
        b"data: [DONE]\n\n"


async def test_the_body_is_read_from_aiohttp_directly_with_the_pinned_sdk() -> None:
    """With this SDK the provider reads aiohttp's ``readany`` itself (no httpx layers): if
    an SDK upgrade moves the transport's response, this fails, and the slow path is used."""
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=sse_body(), content_type="text/event-stream")

    async with tiny_server(handler) as url:
        provider = OpenAIProvider(base_url=url, api_key="x", max_retries=0)
        try:
            response = provider.client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            async with response as raw:
                read = _body_reader(raw)
                assert isinstance(getattr(read, "__self__", None), aiohttp.StreamReader)
                body = b"".join([chunk async for chunk in _drain(read)])
            assert body == sse_body()
            assert await pieces_of(provider) == [Delta("one "), Delta("two"), Finish("stop")]
        finally:
            await provider.aclose()


async def test_a_compressed_body_is_read_through_the_sdk_and_decoded() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=gzip.compress(sse_body()), content_type="text/event-stream",
                            headers={"Content-Encoding": "gzip"})

    async with tiny_server(handler) as url, provider_for(url) as provider:
        assert await pieces_of(provider) == [Delta("one "), Delta("two"), Finish("stop")]


async def _drain(read: Any) -> Any:
    while data := await read():
        yield data
