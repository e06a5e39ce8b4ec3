"""OpenAIProvider: SDK chunks → pieces and SDK errors → ProviderError, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from core.errors import ProviderError
from pipeline.offline_model import OfflineModelServer, compose_answer, count_prompt_tokens
from pipeline.providers import Delta, Finish, OpenAIProvider, Piece, Usage
from tests.procs import free_port

MODEL = "offline"
MESSAGES = [{"role": "user", "content": "tell me about streams"}]


@contextlib.asynccontextmanager
async def provider_for(base_url: str) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(base_url=base_url, api_key="x", timeout_s=5.0, max_retries=0)
    try:
        yield provider
    finally:
        await provider.aclose()


@contextlib.asynccontextmanager
async def tiny_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A loopback aiohttp app answering every chat completion with ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def offline() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer(token_delay_ms=1) as srv:
        yield srv


async def pieces_of(provider: OpenAIProvider, **kwargs: Any) -> list[Piece]:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", MESSAGES)
    return [piece async for piece in provider.stream_chat(**kwargs)]


async def error_of(provider: OpenAIProvider, **kwargs: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await pieces_of(provider, **kwargs)
    return info.value


async def test_stream_pieces(offline: OfflineModelServer) -> None:
    tokens = compose_answer(MODEL, MESSAGES)
    prompt = count_prompt_tokens(MESSAGES)
    async with provider_for(offline.base_url) as provider:
        pieces = await pieces_of(provider)

    assert len([p for p in pieces if isinstance(p, Delta)]) >= 5
    assert pieces == [
        *(Delta(token) for token in tokens),
        Finish("stop"),
        Usage(model=MODEL, prompt_tokens=prompt, completion_tokens=len(tokens),
              total_tokens=prompt + len(tokens)),
    ]
    assert offline.stats.completed == 1


async def test_max_tokens_finishes_with_length(offline: OfflineModelServer) -> None:
    async with provider_for(offline.base_url) as provider:
        pieces = await pieces_of(provider, max_tokens=3)
    tokens = compose_answer(MODEL, MESSAGES, max_tokens=3)
    prompt = count_prompt_tokens(MESSAGES)
    assert pieces == [
        *(Delta(token) for token in tokens),
        Finish("length"),
        Usage(model=MODEL, prompt_tokens=prompt, completion_tokens=3, total_tokens=prompt + 3),
    ]


async def test_list_models(offline: OfflineModelServer) -> None:
    async with provider_for(offline.base_url) as provider:
        assert await provider.list_models() == [MODEL]


# -- error translation ----------------------------------------------------------------------


async def test_unreachable_port_is_retryable_without_status() -> None:
    async with provider_for(f"http://127.0.0.1:{free_port()}/v1") as provider:
        error = await error_of(provider)
    assert (error.status, error.retryable, error.model) == (None, True, MODEL)
    assert "unreachable" in str(error)
    assert isinstance(error.__cause__, Exception)


async def test_unreachable_list_models_is_a_provider_error() -> None:
    async with provider_for(f"http://127.0.0.1:{free_port()}/v1") as provider:
        with pytest.raises(ProviderError) as info:
            await provider.list_models()
    assert (info.value.status, info.value.retryable) == (None, True)


def answering(status: int, message: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        body = {"error": {"message": message, "type": "server_error", "code": None}}
        return web.json_response(body, status=status)

    return handler


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (400, False), (401, False)]
)
async def test_http_status_errors(status: int, retryable: bool) -> None:
    async with tiny_server(answering(status, "nope here")) as url, provider_for(url) as provider:
        error = await error_of(provider)
    assert (error.status, error.retryable) == (status, retryable)
    assert f"HTTP {status}: nope here" in str(error)


async def test_unknown_model_is_404(offline: OfflineModelServer) -> None:
    async with provider_for(offline.base_url) as provider:
        error = await error_of(provider, model="no-such-model")
    assert (error.status, error.retryable, error.model) == (404, False, "no-such-model")
    assert "does not exist" in str(error)


async def test_malformed_chunk_is_a_provider_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {not json}\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with tiny_server(handler) as url, provider_for(url) as provider:
        error = await error_of(provider)
    assert (error.status, error.retryable) == (None, False)
    assert "bad response" in str(error)


async def test_timeout_between_chunks_is_retryable() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()  # never sends a chunk
        return response

    async with tiny_server(handler) as url:
        provider = OpenAIProvider(base_url=url, api_key="x", timeout_s=0.2, max_retries=0)
        try:
            error = await error_of(provider)
        finally:
            release.set()
            await provider.aclose()
    assert (error.status, error.retryable) == (None, True)


# -- disconnects ----------------------------------------------------------------------------


async def poll(predicate: Callable[[], bool], *, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_closing_the_stream_early_disconnects_the_server() -> None:
    async with OfflineModelServer(token_delay_ms=20) as srv, provider_for(srv.base_url) as p:
        stream = p.stream_chat(model=MODEL, messages=MESSAGES)
        assert isinstance(stream, AsyncIterator)
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()  # type: ignore[attr-defined]

        assert all(isinstance(piece, Delta) for piece in first)
        assert await poll(lambda: srv.stats.disconnected == 1), srv.stats
        assert srv.stats.completed == 0
        assert srv.stats.active_streams == 0


def sse_handler(*frames: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A chat-completions handler that streams ``frames`` as they are."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response

    return handler


def chunk_frame(**delta: Any) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def test_comments_ids_and_split_data_lines_are_read_as_sse() -> None:
    """Upstreams send comment keep-alives, ids and CRLF line ends; none is a chunk."""
    frames = (
        b": PROCESSING\n\n",
        b"id: 1\r\n" + chunk_frame(role="assistant", content="Hel").replace(b"\n", b"\r\n"),
        b"retry: 1000\n\n",
        chunk_frame(content="lo"),
        b"data: [DONE]\n\n",
    )
    async with tiny_server(sse_handler(*frames)) as url, provider_for(url) as provider:
        pieces = await pieces_of(provider)
    assert pieces == [Delta("Hel"), Delta("lo")]


async def test_an_error_payload_mid_stream_is_a_provider_error() -> None:
    frames = (
        chunk_frame(content="partial"),
        b'data: {"error": {"message": "overloaded, try later", "type": "server_error"}}\n\n',
    )
    async with tiny_server(sse_handler(*frames)) as url, provider_for(url) as provider:
        received: list[Piece] = []
        with pytest.raises(ProviderError) as info:
            async for piece in provider.stream_chat(model=MODEL, messages=MESSAGES):
                received.append(piece)
    assert received == [Delta("partial")]
    assert "overloaded, try later" in str(info.value) and info.value.status is None
