"""One exception root for the project; subclasses carry typed attributes."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""


class BufferOverflowError(PipelineError):
    """A consumer fell further behind than its bounded buffer allows."""

    def __init__(self, *, max_buffer: int) -> None:
        super().__init__(f"consumer fell more than {max_buffer} events behind; disconnected")
        self.max_buffer = max_buffer


class ProviderError(PipelineError):
    """A model provider failed: unreachable, HTTP error, timeout or a malformed chunk.

    Attributes:
        provider: Which provider (base URL) failed.
        model: The model asked for.
        status: HTTP status when the provider answered, else None.
        retryable: Whether trying again may succeed (timeouts, 5xx, 429, connection).
    """

    def __init__(
        self, message: str, *, provider: str, model: str, status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(f"model call to {model!r} at {provider} failed: {message}")
        self.provider = provider
        self.model = model
        self.status = status
        self.retryable = retryable


class TurnCancelledError(PipelineError):
    """The turn was cancelled before it finished."""


class TurnDeadlineError(PipelineError):
    """A turn ran past its overall deadline (``TURN_DEADLINE_S``) and was stopped.

    Attributes:
        seconds: The deadline.
    """

    retryable = False

    def __init__(self, *, seconds: float) -> None:
        super().__init__(f"the turn ran past its deadline of {seconds:g}s (TURN_DEADLINE_S); stopped")
        self.seconds = seconds


class StoreError(PipelineError):
    """The event store could not write or read."""
