"""Model providers: SDK chunks → our pieces, SDK errors → :class:`ProviderError`, in one place.

Every model call goes through the official ``openai`` client (``AsyncOpenAI``), so any
OpenAI-compatible endpoint works: OpenAI, vLLM, Ollama, LiteLLM, Gemini's compatible
endpoint, or the bundled offline model (:mod:`pipeline.offline_model`).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, cast

import openai
import pydantic
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from core.errors import ProviderError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """A piece of generated text (of choice ``index`` when the request asked for ``n``;
    with its per-token ``logprobs`` when it asked for ``logprobs``; ``refusal`` when it is
    a piece of the model's refusal, OpenAI's ``delta.refusal``)."""

    text: str
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None
    refusal: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Finish:
    """The model stopped: ``stop``, ``length``, ``tool_calls``, ``content_filter``."""

    reason: str
    index: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call, as the provider reported them."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """The model asks for a tool call: its id, function name and arguments JSON, as the
    streamed deltas added up. ``arguments_json`` may be malformed; the caller checks it."""

    id: str
    name: str
    arguments_json: str
    index: int = 0  # the choice that made it


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallPiece:
    """A fragment of a tool call as it streams: call ``call_index`` of choice ``index``; the
    first fragment has the call's ``id`` and ``name``. The complete call follows as a
    :class:`ToolCallRequest`; harnesses that need only whole calls ignore these."""

    call_index: int
    id: str | None
    name: str | None
    arguments: str
    index: int = 0


Piece: TypeAlias = Delta | Finish | Usage | ToolCallRequest | ToolCallPiece


class ChatProvider(Protocol):
    """What harnesses need from a model provider."""

    name: str

    def stream_chat(
        self, *, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None, tool_call_pieces: bool = False,
    ) -> AsyncIterator[Piece]:
        """Stream one chat completion as pieces; raise :class:`ProviderError` on failure.

        With ``tools`` (OpenAI function-calling specs) the model may answer with
        :class:`ToolCallRequest` pieces, one per complete call, before its :class:`Finish`.
        ``params`` are further request fields sent as given (a client's ``temperature``,
        ``stop``, ``n``, ``tools``, ``tool_choice``…); with ``n`` pieces carry their
        choice's ``index``. With ``tool_call_pieces`` each tool-call fragment is also a
        :class:`ToolCallPiece` as it arrives. Callers that use none of these do not pass them.
        """
        ...

    async def list_models(self) -> list[str]:
        """The model ids the provider serves."""
        ...


class OpenAIProvider:
    """A :class:`ChatProvider` over ``openai.AsyncOpenAI``.

    Args:
        base_url: The endpoint, e.g. ``http://127.0.0.1:8081/v1``; None for OpenAI's.
        api_key: The key; the offline model accepts anything.
        timeout_s: Per-request timeout (connect and between chunks).
        max_retries: The SDK's retries of failed requests before the stream starts.
        max_connections: Concurrent HTTP connections to the provider (model calls).
    """

    def __init__(
        self, *, base_url: str | None, api_key: str | None, timeout_s: float = 60.0,
        max_retries: int = 1, max_connections: int = 1000,
    ) -> None:
        # The SDK's own Limits type (of whichever httpx it ships with), with our bound on
        # concurrent model calls: past it, calls wait for a connection.
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=max_connections, max_keepalive_connections=min(max_connections, 100),
        )
        self.client = AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout_s,
            max_retries=max_retries, http_client=openai.DefaultAioHttpClient(limits=limits),
        )
        self.name = str(self.client.base_url).rstrip("/")
        #: Failed model calls so far (``agentflow_provider_errors_total``).
        self.failures = 0

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.client.close()

    async def list_models(self) -> list[str]:
        try:
            page = await self.client.models.list()
        except openai.OpenAIError as exc:
            raise self._translate(exc, model="*") from exc
        return [model.id async for model in page]

    async def stream_chat(
        self, *, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None, tool_call_pieces: bool = False,
    ) -> AsyncIterator[Piece]:
        # Tool calls arrive in pieces (id and name first, then the arguments in fragments),
        # keyed by choice and index; they are complete when the choice finishes.
        calls: dict[int, dict[int, list[str]]] = {}  # choice → index → [id, name, arguments]
        extra = dict(params or {})
        if tools:
            extra["tools"] = list(tools)
        try:
            # The SDK makes the request (base URL, auth, retries, timeouts, HTTP errors);
            # the chunks are parsed here with one pydantic ``model_validate_json`` each
            # (about 7 µs) instead of the SDK's per-chunk ``construct_type`` (about 190 µs),
            # which made the model client the bottleneck of a busy server.
            response = self.client.chat.completions.with_streaming_response.create(
                model=model,
                # The messages go as they are, in extra_body: the SDK's per-message typed
                # transform cost about 0.3 ms each on the event loop (35,000 messages froze
                # the server for 10 s; issue 10). They are plain JSON dicts already.
                messages=cast("list[ChatCompletionMessageParam]", []),
                # The client's further fields are sent as given too, not through the SDK's
                # typed arguments: a field this SDK version does not know still reaches the
                # provider, unchanged.
                extra_body={"messages": list(messages), **extra},
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=openai.omit if max_tokens is None else max_tokens,
            )
            # Leaving this block (finished, failed, or the consumer closed us) closes the
            # HTTP response, so the provider sees the disconnect at once.
            async with response as raw:
                kind = raw.headers.get("content-type", "")
                if not kind.lower().startswith("text/event-stream"):
                    # e.g. a proxy's HTML error page with status 200: not an answer.
                    raise BadStream(f"HTTP {raw.status_code} answer is not an event stream "
                                    f"(content-type {kind[:80] or 'missing'!r})")
                ended = _End()
                finished = False
                async for chunk in _chunks(sse_lines(raw.iter_bytes()), ended):
                    for choice in chunk.choices:
                        index = choice.index
                        if choice.delta is not None and choice.delta.content:
                            yield Delta(choice.delta.content, index, _logprobs(choice))
                        if choice.delta is not None and choice.delta.refusal:
                            yield Delta(choice.delta.refusal, index, refusal=True)
                        for call in (choice.delta.tool_calls if choice.delta is not None else None) or ():
                            slot = calls.setdefault(index, {}).setdefault(call.index, ["", "", ""])
                            slot[0] = slot[0] or call.id or ""
                            name = call.function.name if call.function is not None else None
                            fragment = (call.function.arguments if call.function is not None
                                        else None) or ""
                            first = not slot[1]
                            if call.function is not None:
                                # Some servers repeat the name on every fragment: keep the first.
                                slot[1] = slot[1] or name or ""
                                slot[2] += fragment
                            if tool_call_pieces:
                                yield ToolCallPiece(call_index=call.index,
                                                    id=call.id if first else None,
                                                    name=name if first else None,
                                                    arguments=fragment, index=index)
                        if choice.finish_reason:
                            finished = True
                            for piece in _complete_calls(calls.pop(index, {}), index):
                                yield piece
                            yield Finish(choice.finish_reason, index)
                    if chunk.usage is not None:
                        yield Usage(
                            model=chunk.model or model,
                            prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens,
                            total_tokens=chunk.usage.total_tokens,
                        )
                if not finished and not ended.done:
                    # The connection closed mid-answer (a proxy cut it, the server died):
                    # what arrived may be a fragment; never a completed answer.
                    raise BadStream("the stream ended without a finish_reason or [DONE]")
            for index, pending in sorted(calls.items()):  # ended without finish_reason
                for piece in _complete_calls(pending, index):
                    yield piece
        except Exception as exc:  # every failure of the call becomes one ProviderError
            error = self._translate(exc, model=model)
            self.failures += 1
            log.warning("%s", error, extra={"model": model, "provider_status": error.status})
            raise error from exc

    def _translate(self, exc: Exception, *, model: str) -> ProviderError:
        match exc:
            case openai.APIStatusError(status_code=status):
                return ProviderError(
                    f"HTTP {status}: {_message_of(exc)}", provider=self.name, model=model,
                    status=status, retryable=status == 429 or status >= 500,
                )
            case openai.APITimeoutError() if _refused(exc):
                # The aiohttp transport reports a refused connection as a connect timeout.
                return ProviderError(f"unreachable ({_refused(exc)})", provider=self.name,
                                     model=model, retryable=True)
            case openai.APITimeoutError():
                return ProviderError("timed out", provider=self.name, model=model, retryable=True)
            case openai.APIConnectionError():
                return ProviderError(
                    f"unreachable ({exc.__cause__ or exc})", provider=self.name, model=model,
                    retryable=True,
                )
            case StreamFailure():
                return ProviderError(f"failed mid-stream: {exc}", provider=self.name, model=model)
            case BadStream():
                return ProviderError(str(exc), provider=self.name, model=model, retryable=True)
            case _ if _is_transport_error(exc):
                # A transport error while reading the body (the SDK maps only those of the
                # request itself): the connection broke or a read timed out.
                return ProviderError(f"stream broke: {type(exc).__name__}: {exc}",
                                     provider=self.name, model=model, retryable=True)
            case _:
                return ProviderError(
                    f"bad response: {type(exc).__name__}: {exc}", provider=self.name, model=model,
                )


@dataclasses.dataclass(slots=True)
class _End:
    """Set by :func:`_chunks` when the body ended with ``data: [DONE]``."""

    done: bool = False


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an SSE body as the SSE spec splits them: at CR, LF or CRLF only.

    Not httpx's ``iter_lines``, which also splits at U+2028, U+2029, U+0085 (and VT, FF, …):
    an upstream that sends those raw inside its JSON (pydantic-based servers do) would have
    its chunks cut, and a model could write ``data:`` lines of its own (issue 10).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in chunks:
        text = pending + decoder.decode(chunk)
        held = "\r" if text.endswith("\r") else ""  # maybe the first half of a CRLF
        text = text.removesuffix("\r")
        *lines, pending = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending += held
        for line in lines:
            yield line
    pending += decoder.decode(b"", final=True)
    for line in pending.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line:
            yield line


async def _chunks(lines: AsyncIterator[str], ended: _End) -> AsyncIterator[ChatCompletionChunk]:
    """``chat.completion.chunk`` objects from an SSE body, until ``data: [DONE]``
    (``ended.done`` then says so).

    Follows the SSE rules the SDK's decoder follows: ``data:`` lines joined, a blank line
    ends an event, comments and ``id:``/``retry:`` lines ignored; an ``error`` event or a
    ``{"error": …}`` payload is the provider reporting a failure mid-stream.
    """
    data: list[str] = []
    event = ""
    async for line in lines:
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            continue
        if not data:
            continue
        payload, kind = "\n".join(data), event
        data, event = [], ""
        if payload.startswith("[DONE]"):
            ended.done = True
            return
        try:
            chunk = ChatCompletionChunk.model_validate_json(payload)
        except pydantic.ValidationError:
            chunk = None
        if kind == "error" or chunk is None:
            body = json.loads(payload)  # not JSON at all: JSONDecodeError, a bad chunk
            if kind == "error" or (isinstance(body, dict) and "error" in body):
                error = body.get("error", body) if isinstance(body, dict) else body
                message = error.get("message") if isinstance(error, dict) else None
                raise StreamFailure(str(message or error))
            # Not a chunk: raises the validation error. A chunk that only the strict JSON
            # parser refused (a lone surrogate escape) is kept, never skipped in silence.
            chunk = ChatCompletionChunk.model_validate(body)
        if chunk is not None:
            yield chunk


def _refused(exc: BaseException) -> str | None:
    """The connection error under ``exc``, if the provider refused the connection."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _is_transport_error(exc: Exception) -> bool:
    """An HTTP transport error of the SDK's HTTP stack (httpx or its fork), raised while the
    body is read; the SDK itself maps only those of sending the request."""
    return type(exc).__module__.split(".")[0].startswith(("httpx", "httpcore"))


class StreamFailure(Exception):
    """The provider reported an error in the middle of a stream."""


class BadStream(Exception):
    """The answer is not a whole event stream: another content type, or cut short."""


def _logprobs(choice: Any) -> list[dict[str, Any]] | None:
    """A streamed choice's per-token log probabilities (OpenAI's ``logprobs.content``)."""
    logprobs = choice.logprobs
    if logprobs is None or not logprobs.content:
        return None
    return [item.model_dump(mode="json") for item in logprobs.content]


def _complete_calls(calls: dict[int, list[str]], choice: int = 0) -> list[ToolCallRequest]:
    """The accumulated calls of one choice in index order (then forgotten)."""
    done = [
        ToolCallRequest(id=call_id or f"call_{index}", name=name, arguments_json=arguments,
                        index=choice)
        for index, (call_id, name, arguments) in sorted(calls.items())
    ]
    calls.clear()
    return done


def _message_of(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message
