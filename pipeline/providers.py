"""Model providers: SDK chunks → our pieces, SDK errors → :class:`ProviderError`, in one place.

Every model call goes through the official ``openai`` client (``AsyncOpenAI``), so any
OpenAI-compatible endpoint works: OpenAI, vLLM, Ollama, LiteLLM, Gemini's compatible
endpoint, or the bundled offline model (:mod:`pipeline.offline_model`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol, TypeAlias, cast, get_args

import aiohttp
import openai
import pydantic_core
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs

from core.errors import ProviderError

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)  # not frozen: one per token, and a frozen init costs 4×
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
        extra = dict(params or {})
        if tools:
            extra["tools"] = list(tools)
        try:
            # The SDK makes the request (base URL, auth, retries, timeouts, HTTP errors);
            # the body is read and parsed here (:class:`ChunkReader`): the SDK's per-chunk
            # ``construct_type`` cost about 190 µs, a pydantic validation of each chunk
            # about 30 µs under load, the lean read of the fields we use a few.
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
                reader = ChunkReader(model=model, tool_call_pieces=tool_call_pieces)
                next_bytes = _body_reader(raw)
                while not reader.done and (data := await next_bytes()):
                    for piece in reader.feed(data):
                        yield piece
                if not reader.finished and not reader.done:
                    # The connection closed mid-answer (a proxy cut it, the server died):
                    # what arrived may be a fragment; never a completed answer.
                    raise BadStream("the stream ended without a finish_reason or [DONE]")
            for piece in reader.pending_calls():  # ended without finish_reason
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
            case _ if _is_transport_error(exc) or isinstance(exc, aiohttp.ClientError):
                # A transport error while reading the body (the SDK maps only those of the
                # request itself): the connection broke or a read timed out.
                return ProviderError(f"stream broke: {type(exc).__name__}: {exc}",
                                     provider=self.name, model=model, retryable=True)
            case _:
                return ProviderError(
                    f"bad response: {type(exc).__name__}: {exc}", provider=self.name, model=model,
                )


class SSEDecoder:
    """The events of an SSE body, fed its bytes as they arrive: ``(event, data)`` pairs.

    Lines end at CR, LF or CRLF only, as the SSE spec says (split on bytes: no UTF-8
    sequence holds those bytes; not httpx's ``iter_lines``, which also splits at U+2028,
    U+2029, U+0085, VT, FF…, so an upstream that sends those raw inside its JSON, as
    pydantic-based servers do, would have its chunks cut, and a model could write ``data:``
    lines of its own; issue 10). ``data:`` lines are joined with LF, a blank line ends an
    event, comments and ``id:``/``retry:`` lines are ignored; an event left unfinished when
    the body ends is dropped, as the spec says.
    """

    __slots__ = ("_data", "_event", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._event = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The events that ``chunk`` completes, in order."""
        text = self._pending + chunk if self._pending else chunk
        if b"\r" in text:
            held = text.endswith(b"\r")  # maybe the first half of a CRLF
            text = text[:-1] if held else text
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            *lines, pending = text.split(b"\n")
            self._pending = pending + b"\r" if held else pending
        else:
            *lines, self._pending = text.split(b"\n")
        events: list[tuple[bytes, bytes]] = []
        data = self._data
        for line in lines:
            if line:
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                    continue
                field, _, value = line.partition(b":")
                if field == b"event":
                    self._event = value[1:] if value.startswith(b" ") else value
                continue
            if data:
                events.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                data.clear()
                self._event = b""
        return events


class ChunkReader:
    """An OpenAI-compatible ``chat.completion.chunk`` stream → :data:`Piece` s, fed the
    body's bytes as they arrive (sync: no async generator per layer).

    Each chunk is read leanly: ``json.loads`` and the fields we use, checked for the types
    the SDK's model gives them. A chunk that is not so plain (a number as a string, a
    field the lean read does not know the type of) goes through the SDK's pydantic model,
    which either normalises it or refuses it (a ``ValidationError``: a bad chunk is an
    error, never skipped). An ``error`` event or an ``{"error": …}`` payload is the
    provider reporting a failure mid-stream (:class:`StreamFailure`). ``data: [DONE]``
    sets ``done``; a ``finish_reason`` sets ``finished``.

    Tool calls arrive in pieces (id and name first, then the arguments in fragments), keyed
    by choice and index; they are complete when the choice finishes.
    """

    def __init__(self, *, model: str, tool_call_pieces: bool = False) -> None:
        self.model = model
        self.tool_call_pieces = tool_call_pieces
        self.done = False
        self.finished = False
        self._sse = SSEDecoder()
        self._calls: dict[int, dict[int, list[str]]] = {}  # choice → index → [id, name, args]

    def feed(self, data: bytes) -> Iterator[Piece]:
        """The pieces of the chunks that ``data`` completes (nothing after ``[DONE]``); a
        bad chunk raises after the pieces of the chunks before it."""
        for kind, payload in self._sse.feed(data):
            if self.done:
                return
            if payload.startswith(b"[DONE]"):
                self.done = True
                return
            yield from self._read(kind, payload)

    def pending_calls(self) -> list[ToolCallRequest]:
        """The calls of choices that never finished (a stream ended by ``[DONE]`` alone)."""
        done: list[ToolCallRequest] = []
        for index, pending in sorted(self._calls.items()):
            done += _complete_calls(pending, index)
        self._calls.clear()
        return done

    def _read(self, kind: bytes, payload: bytes) -> list[Piece]:
        try:
            # pydantic's JSON parser (jiter): about 1.5 µs a chunk here, the stdlib's 8.
            body = pydantic_core.from_json(payload, cache_strings="keys")
        except ValueError:
            # What it refuses, the stdlib decides: a lone surrogate escape (kept), bytes
            # that are not UTF-8 (replaced), or not JSON at all (JSONDecodeError: a bad chunk).
            body = json.loads(payload.decode("utf-8", errors="replace"))
        if kind == b"error" or (isinstance(body, dict) and "error" in body):
            error = body.get("error", body) if isinstance(body, dict) else body
            message = error.get("message") if isinstance(error, dict) else None
            raise StreamFailure(str(message or error))
        pieces: list[Piece] = []
        calls = {choice: {i: list(slot) for i, slot in slots.items()}
                 for choice, slots in self._calls.items()} if self._calls else {}
        finished = self.finished
        try:
            self._pieces(body, pieces)
        except _NotPlain:
            # What the lean read did of this chunk is undone; the SDK's model refuses it
            # (ValidationError) or normalises it, and the normalised form is plain.
            pieces.clear()
            self._calls, self.finished = calls, finished
            chunk = ChatCompletionChunk.model_validate(body)
            self._pieces(chunk.model_dump(mode="json", exclude_unset=True), pieces)
        return pieces

    def _pieces(self, body: Any, pieces: list[Piece]) -> None:
        if (type(body) is not dict or body.get("object") != "chat.completion.chunk"
                or type(body.get("id")) is not str or type(body.get("created")) is not int):
            raise _NotPlain
        model = body.get("model")
        choices = body.get("choices")
        usage = body.get("usage")
        if type(model) is not str or type(choices) is not list:
            raise _NotPlain
        for choice in choices:
            if type(choice) is not dict:
                raise _NotPlain
            index = choice.get("index")
            delta = choice.get("delta")
            reason = choice.get("finish_reason")
            if type(index) is not int or type(delta) is not dict or not (
                    reason is None or reason in FINISH_REASONS):
                raise _NotPlain
            content = delta.get("content")
            refusal = delta.get("refusal")
            tool_calls = delta.get("tool_calls")
            if not (_optional_str(content) and _optional_str(refusal)
                    and (tool_calls is None or type(tool_calls) is list)):
                raise _NotPlain
            if content:
                logprobs = choice.get("logprobs")
                pieces.append(Delta(content, index,
                                    None if logprobs is None else _logprobs(logprobs)))
            if refusal:
                pieces.append(Delta(refusal, index, refusal=True))
            if tool_calls:
                self._tool_calls(tool_calls, index, pieces)
            if reason:
                self.finished = True
                pieces += _complete_calls(self._calls.pop(index, {}), index)
                pieces.append(Finish(reason, index))
        if usage is not None:
            if type(usage) is not dict:
                raise _NotPlain
            prompt, completion, total = (usage.get("prompt_tokens"),
                                         usage.get("completion_tokens"), usage.get("total_tokens"))
            if type(prompt) is not int or type(completion) is not int or type(total) is not int:
                raise _NotPlain
            pieces.append(Usage(model=model or self.model, prompt_tokens=prompt,
                                completion_tokens=completion, total_tokens=total))

    def _tool_calls(self, calls: list[Any], index: int, pieces: list[Piece]) -> None:
        for call in calls:
            if type(call) is not dict:
                raise _NotPlain
            call_index, call_id = call.get("index"), call.get("id")
            function = call.get("function")
            if type(call_index) is not int or not _optional_str(call_id) or not (
                    function is None or type(function) is dict):
                raise _NotPlain
            name = function.get("name") if function is not None else None
            fragment = function.get("arguments") if function is not None else None
            if not (_optional_str(name) and _optional_str(fragment)):
                raise _NotPlain
            fragment = fragment or ""
            slot = self._calls.setdefault(index, {}).setdefault(call_index, ["", "", ""])
            slot[0] = slot[0] or call_id or ""
            first = not slot[1]
            if function is not None:
                # Some servers repeat the name on every fragment: keep the first.
                slot[1] = slot[1] or name or ""
                slot[2] += fragment
            if self.tool_call_pieces:
                pieces.append(ToolCallPiece(call_index=call_index, id=call_id if first else None,
                                            name=name if first else None, arguments=fragment,
                                            index=index))


class _NotPlain(Exception):
    """A chunk the lean read does not take as it is (the SDK's model decides)."""

    def __str__(self) -> str:
        return "a chunk the SDK's model accepts but the lean read does not"


#: The finish reasons the SDK's chunk model admits (another is a bad chunk, as it says).
FINISH_REASONS: Final = frozenset(
    reason for literal in get_args(ChunkChoice.model_fields["finish_reason"].annotation)
    for reason in get_args(literal))


def _optional_str(value: object) -> bool:
    return value is None or type(value) is str


def _body_reader(raw: Any) -> Callable[[], Awaitable[bytes]]:
    """What reads the next bytes of a streamed response's body (``b""`` at its end).

    The SDK's aiohttp transport (``DefaultAioHttpClient``) keeps aiohttp's response under
    the httpx one: its ``content.readany`` is read directly, without the six async
    generators between (httpx's byte iterators and the transport's), when the body is not
    compressed (the transport leaves decoding to httpx). Anything else goes through the
    SDK's ``iter_bytes``.
    """
    stream: Any = getattr(raw.http_response, "stream", None)
    for _ in range(3):  # httpx wraps the transport's stream (its elapsed-time stream)
        if hasattr(stream, "_aiohttp_response") or not hasattr(stream, "_stream"):
            break
        stream = stream._stream
    aiohttp_response = getattr(stream, "_aiohttp_response", None)
    encoding = raw.headers.get("content-encoding", "identity").strip().lower()
    if isinstance(aiohttp_response, aiohttp.ClientResponse) and encoding in ("", "identity"):
        return cast("Callable[[], Awaitable[bytes]]", aiohttp_response.content.readany)
    chunks = cast("AsyncIterator[bytes]", raw.iter_bytes())

    async def next_bytes() -> bytes:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""

    return next_bytes


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


def _logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """A streamed choice's per-token log probabilities (OpenAI's ``logprobs.content``), in
    the SDK model's form (rare: read through it)."""
    parsed = ChoiceLogprobs.model_validate(logprobs)
    if not parsed.content:
        return None
    return [item.model_dump(mode="json") for item in parsed.content]


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
