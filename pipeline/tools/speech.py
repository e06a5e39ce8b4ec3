"""Speech tools through the ``openai`` client's audio endpoints.

``speech.transcribe`` sends audio (base64, or a file in the workspace) to
``/v1/audio/transcriptions``; ``speech.synthesize`` asks ``/v1/audio/speech`` for audio and
returns it as base64 or saves it in the workspace. Both go through the same
``openai.AsyncOpenAI`` client as the chat model, so they reach OpenAI, any compatible
endpoint, or the bundled offline model (which implements both deterministically: see
:mod:`pipeline.offline_model`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Literal, Self

import openai
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.tools.registry import Tool
from pipeline.tools.safety import ToolRefusal, Workspace

__all__ = ["SynthesizeParams", "TranscribeParams", "speech_provider_info", "speech_tools"]

AudioFormat = Literal["wav", "mp3", "opus", "aac", "flac", "pcm"]
_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
         "flac": "audio/flac", "pcm": "audio/pcm", "webm": "audio/webm", "m4a": "audio/mp4",
         "ogg": "audio/ogg", "mpeg": "audio/mpeg", "mpga": "audio/mpeg", "mp4": "audio/mp4"}


class TranscribeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audio_base64: str | None = Field(default=None, description="the audio, base64-encoded")
    path: str | None = Field(default=None, description="or: an audio file in the workspace")
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}$", description="ISO-639-1, e.g. en")
    model: str | None = Field(default=None, max_length=100, description="default DEFAULT_STT_MODEL")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.audio_base64 is None) == (self.path is None):
            raise ValueError("give exactly one of audio_base64 and path")
        return self


class SynthesizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="what to say")
    voice: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$",
                              description="default DEFAULT_TTS_VOICE")
    format: AudioFormat = Field(default="wav", description="audio format")
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    model: str | None = Field(default=None, max_length=100, description="default DEFAULT_TTS_MODEL")
    path: str | None = Field(default=None, description="save the audio to this workspace file "
                                                        "instead of returning it as base64")


def speech_provider_info(
    *, base_url: str, offline: bool, enabled: bool, stt_model: str, tts_model: str, voice: str,
) -> list[dict[str, Any]]:
    """What ``GET /speech/providers`` lists: one provider, the model endpoint's audio API."""
    return [{
        "name": "openai", "enabled": enabled, "offline": offline, "base_url": base_url,
        "transcribe": {"model": stt_model, "endpoint": "/v1/audio/transcriptions"},
        "synthesize": {"model": tts_model, "voice": voice, "endpoint": "/v1/audio/speech",
                       "formats": ["wav"] if offline else list(_MIME)[:6]},
        "default": True,
    }]


def _provider_error(exc: openai.OpenAIError) -> ToolRefusal:
    match exc:
        case openai.APIStatusError(status_code=status):
            body = exc.body
            message = exc.message
            if isinstance(body, dict):
                error = body.get("error", body)
                if isinstance(error, dict) and isinstance(error.get("message"), str):
                    message = error["message"]
            return ToolRefusal(f"the speech provider answered HTTP {status}: {message}")
        case openai.APITimeoutError():
            return ToolRefusal("the speech provider timed out")
        case openai.APIConnectionError():
            return ToolRefusal(f"the speech provider is unreachable ({exc.__cause__ or exc})")
        case _:
            return ToolRefusal(f"the speech provider failed: {type(exc).__name__}: {exc}")


def speech_tools(
    workspace: Workspace, client: openai.AsyncOpenAI | None, *, enabled: bool,
    disabled_reason: str | None, stt_model: str, tts_model: str, voice: str,
    max_audio_bytes: int, max_text_chars: int, timeout_s: float,
) -> list[Tool[Any]]:
    """The two speech tools; disabled when there is no client."""
    if client is None and enabled:
        enabled, disabled_reason = False, "no speech provider configured"

    async def transcribe(params: TranscribeParams) -> dict[str, Any]:
        assert client is not None
        if params.path is not None:
            parts = workspace.locate(params.path)
            read = await asyncio.to_thread(workspace.read, parts, limit=max_audio_bytes)
            if read.truncated:
                raise ToolRefusal(f"the audio is over {max_audio_bytes} bytes (SPEECH_MAX_AUDIO_BYTES)")
            audio, name = read.data, parts[-1]
        else:
            assert params.audio_base64 is not None
            if len(params.audio_base64) > max_audio_bytes * 4 // 3 + 4:
                raise ToolRefusal(f"the audio is over {max_audio_bytes} bytes (SPEECH_MAX_AUDIO_BYTES)")
            try:
                audio = base64.b64decode(params.audio_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ToolRefusal(f"audio_base64 is not valid base64: {exc}") from exc
            name = "audio.wav"
        if not audio:
            raise ToolRefusal("the audio is empty")
        model = params.model or stt_model
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else "wav"
        try:
            result = await client.audio.transcriptions.create(
                model=model, file=(name, audio, _MIME.get(suffix, "application/octet-stream")),
                language=params.language if params.language is not None else openai.omit,
            )
        except openai.OpenAIError as exc:
            raise _provider_error(exc) from exc
        return {"text": result.text, "model": model, "bytes": len(audio)}

    async def synthesize(params: SynthesizeParams) -> dict[str, Any]:
        assert client is not None
        if len(params.text) > max_text_chars:
            raise ToolRefusal(f"text is {len(params.text)} characters; the limit is "
                              f"{max_text_chars} (SPEECH_MAX_TEXT_CHARS)")
        parts = workspace.locate(params.path) if params.path is not None else None
        if parts is not None and any(p.lower() == ".git" for p in parts):
            raise ToolRefusal("tools do not write inside .git folders")
        model = params.model or tts_model
        chosen = params.voice or voice
        try:
            response = await client.audio.speech.create(
                model=model, voice=chosen, input=params.text, response_format=params.format,
                speed=params.speed,
            )
        except openai.OpenAIError as exc:
            raise _provider_error(exc) from exc
        audio = response.content
        if len(audio) > max_audio_bytes:
            raise ToolRefusal(f"the provider sent {len(audio)} bytes of audio; the limit is "
                              f"{max_audio_bytes} (SPEECH_MAX_AUDIO_BYTES)")
        out: dict[str, Any] = {"format": params.format, "bytes": len(audio), "model": model,
                               "voice": chosen}
        if parts is not None:
            await asyncio.to_thread(workspace.write, parts, audio)
            out["path"] = workspace.relative(parts)
        else:
            out["audio_base64"] = base64.b64encode(audio).decode("ascii")
        return out

    common: dict[str, Any] = {"family": "speech", "enabled": enabled,
                              "disabled_reason": disabled_reason, "timeout_s": timeout_s}
    return [
        Tool(name="speech.transcribe", params=TranscribeParams, run=transcribe, description=(
            "Transcribe speech to text. Give the audio as base64 or as a file path in the "
            "workspace."), **common),
        Tool(name="speech.synthesize", params=SynthesizeParams, run=synthesize, description=(
            "Turn text into speech audio; returns it as base64, or saves it to a workspace "
            "file when path is given."), **common),
    ]
