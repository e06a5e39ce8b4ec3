"""Settings: every limit and knob, from the environment (pydantic-settings) or flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.agent_settings import (
    AgentConfig,
    PriceConfig,
    ProviderConfig,
    check_agent_names,
    check_provider_names,
)


class Settings(BaseSettings):
    """All settings, read from environment variables of the same name (upper case).

    Only ``OPENAI_*`` keep their usual names; the rest are plain upper-case names too,
    e.g. ``DB_PATH``, ``FLUSH_INTERVAL_MS``. See the README's settings table.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    # Server
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="over it → 413")
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="running turns get this long on SIGTERM")
    heartbeat_s: float = Field(default=15.0, gt=0, description="comment line on idle native streams")
    sse_retry_ms: int = Field(default=2000, ge=0, description="reconnect advice sent to EventSource")
    client_write_timeout_s: float = Field(
        default=30.0, gt=0, description="a write blocked longer cuts the client"
    )
    client_buffer_events: int = Field(default=4096, ge=1, description="events a slow SSE client may lag")

    # Model provider (any OpenAI-compatible endpoint)
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    default_model: str = "offline"
    models: list[str] = Field(default_factory=list, description="models to offer; default: ask the provider")
    model_timeout_s: float = Field(default=60.0, gt=0)
    model_max_retries: int = Field(default=1, ge=0)
    model_max_connections: int = Field(default=4096, ge=1, description="concurrent model calls")

    # Offline model, started when neither OPENAI_BASE_URL nor OPENAI_API_KEY is set
    offline_token_delay_ms: float = Field(default=20.0, ge=0)

    # Store
    db_path: Path = Path("./data/events.duckdb")
    flush_interval_ms: float = Field(default=250.0, gt=0, description="max age of an unflushed event")
    flush_max_rows: int = Field(default=2048, ge=1, description="flush when this many rows wait")
    store_threads: int = Field(
        default=1, ge=0,
        description="DuckDB worker threads of the store; 0 = DuckDB's default (one per core)")
    history_max_messages: int = Field(default=200, ge=0, description="earlier messages memory loads")
    # -- hot path (issue 12) --
    history_cache_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0,
        description="recent conversations' messages kept in memory for memory; 0 = off")
    gc_gen0_threshold: int = Field(
        default=10_000, ge=0,
        description="allocations between young-generation collections; 0 keeps Python's (700)")
    gc_freeze: bool = Field(
        default=True, description="move the startup heap out of the collector's scans once serving")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="auto: uvloop where it is installed (it is a dependency off Windows), "
                    "else asyncio's; uvloop: refuse to start without it")

    # Roundtable
    roundtable_max_rounds: int = Field(default=10, ge=1, description="more rounds → 400")
    roundtable_max_panelists: int = Field(default=8, ge=1, description="a larger panel → 400")
    roundtable_window: int = Field(
        default=8, ge=1, description="events the panel may run ahead of its client"
    )
    roundtable_max_queue: int = Field(default=100_016, ge=16, description="queued events per panelist")
    roundtable_panel: list[str] = Field(
        default_factory=lambda: ["alice", "bob", "carol"],
        description="the panel of the 'roundtable' model on /v1/chat/completions",
    )
    roundtable_rounds: int = Field(default=2, ge=1, description="rounds of the 'roundtable' model")

    # Tools
    allow_fs_base: Path | None = Field(
        default=None, description="the only folder tools touch; default: workspace/ beside DB_PATH"
    )
    enable_fs: bool = True
    enable_git: bool = True
    enable_terminal: bool = True
    enable_speech: bool = True
    disabled_tools: list[str] = Field(default_factory=list, description="tool names to switch off")
    max_tool_steps: int = Field(default=8, ge=0, description="model → tools rounds per response")
    max_tool_calls_per_step: int = Field(default=8, ge=1, description="tool calls run per round")
    tool_timeout_s: float = Field(default=30.0, gt=0, description="longest any one tool call runs")
    tool_arguments_max_bytes: int = Field(default=2_097_152, ge=1024, description="tool arguments JSON")
    tool_output_max_bytes: int = Field(default=65_536, ge=256, description="fs.read / command output cap")
    tool_result_max_chars: int = Field(default=16_000, ge=256, description="a result as the model sees it")
    fs_max_write_bytes: int = Field(default=1_048_576, ge=1, description="largest file fs tools write")
    fs_max_path_chars: int = Field(default=1024, ge=16, description="longer tool paths are refused")
    terminal_allowlist: list[str] = Field(
        default_factory=lambda: ["echo", "pwd", "date", "ls", "cat", "head", "tail", "wc", "grep",
                                 "find", "sleep"],
        description="programs terminal.exec may run",
    )
    terminal_path: str = Field(default="/usr/local/bin:/usr/bin:/bin", description="where programs are found")
    terminal_timeout_s: float = Field(default=10.0, gt=0, description="default terminal.exec timeout")
    terminal_max_timeout_s: float = Field(default=60.0, gt=0, description="largest timeout_s allowed")
    terminal_max_args: int = Field(default=64, ge=1, description="arguments per command")
    terminal_max_arg_chars: int = Field(default=4096, ge=16, description="characters per argument")
    git_timeout_s: float = Field(default=10.0, gt=0, description="git.status timeout")
    default_stt_model: str = Field(default="whisper-1", description="speech.transcribe model")
    default_tts_model: str = Field(default="tts-1", description="speech.synthesize model")
    default_tts_voice: str = Field(default="alloy", description="speech.synthesize voice")
    speech_max_audio_bytes: int = Field(default=10_000_000, ge=1024, description="audio in or out")
    speech_max_text_chars: int = Field(default=4096, ge=1, description="text to synthesize")

    @property
    def fs_base(self) -> Path:
        """The tools' folder: ``ALLOW_FS_BASE``, else ``workspace/`` beside the DuckDB file."""
        return self.allow_fs_base if self.allow_fs_base is not None else self.db_path.parent / "workspace"

    @property
    def offline(self) -> bool:
        """True when the bundled offline model serves the model calls."""
        return not self.openai_base_url and not self.openai_api_key

    # Analysts
    query_max_rows: int = Field(default=10_000, ge=1, description="rows /v1/query returns at most")
    query_timeout_s: float = Field(default=10.0, gt=0, description="a longer query is interrupted")
    export_dir: Path | None = Field(default=None, description="Parquet lake; default: lake/ beside DB_PATH")
    export_interval_s: float = Field(default=300.0, ge=0, description="scheduled export; 0 = on demand only")
    admin_key: str | None = Field(default=None, repr=False, description="Bearer key for /v1/query, export")

    # -- the door and the store's trust (issue 10): add settings of that area below ----------
    # store and upstream
    store_backlog_max_rows: int = Field(
        default=200_000, ge=1, description="rows kept while the store cannot write; then new turns get 503")
    store_retry_min_ms: float = Field(default=100.0, gt=0, description="first retry of a refused write")
    store_retry_max_ms: float = Field(default=5_000.0, gt=0, description="longest wait between retries")
    store_barrier_timeout_s: float = Field(
        default=10.0, gt=0, description="longest a turn waits for the store to hold its events")
    done_barrier: bool = Field(default=True, description="send done only once the turn's events are stored")
    turn_deadline_s: float = Field(default=600.0, gt=0, description="longest a turn may run")
    # the door
    max_messages: int = Field(default=2048, ge=1, description="messages per request; more → 400")
    max_json_depth: int = Field(default=64, ge=2, le=500, description="deeper JSON bodies → 400")
    header_timeout_s: float = Field(default=10.0, gt=0, description="headers must arrive within it")
    listen_backlog: int = Field(
        default=1024, ge=1, le=65535, description="connections the kernel queues before the "
        "server accepts them (capped by net.core.somaxconn); past it, a burst is reset")
    body_timeout_s: float = Field(default=30.0, gt=0, description="a body must arrive within it → 408")
    allowed_hosts: list[str] | None = Field(
        default=None, description="Host names answered; default: loopback names when bound there")
    cors_origins: list[str] = Field(default_factory=list, description="origins browsers may call from")
    api_key: str | None = Field(default=None, repr=False, description="one Bearer key for /v1/*")
    api_keys: list[str] = Field(default_factory=list, repr=False, description="Bearer keys for /v1/*")
    allow_no_auth: bool = Field(default=False, description="serve a non-loopback address without keys")
    max_live_turns: int = Field(default=200, ge=1, description="running turns; more → 503")
    max_open_streams: int = Field(default=1024, ge=1, description="open SSE streams; more → 503")
    rate_limit_rpm: int = Field(default=0, ge=0, description="turns per minute per key or address; 0 = off")
    query_max_bytes: int = Field(default=16_777_216, ge=1024, description="/v1/query answer size")
    # (end of the trust settings)

    # -- operations: logs, metrics, traces (issue 15): add settings of that area below -------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="the least severe log line printed")
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: every line the server prints is one JSON object")
    access_log: bool = Field(default=True, description="one log line per HTTP request")
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP collector (e.g. http://127.0.0.1:4318): traces on")
    otel_service_name: str = Field(default="agentflow", description="service.name of the traces")

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if value.lower() in {"debug", "info", "warning", "error", "critical"} \
            else value.lower()

    # wire and tools
    store_storage_version: str = Field(
        default="v1.4.0", pattern=r"^(v\d+\.\d+\.\d+|latest)$",
        description="DuckDB storage format of a new store file (v1.4.0: read by DuckDB >= 1.4 tools)",
    )
    # (end of the operations settings)

    # -- the OpenAI wire (issue 11): add settings of that area below ------------------------
    # chat completions
    openai_wire_server_tools: bool = Field(
        default=False, description="offer the server's own tools to /v1/chat/completions callers"
    )
    openai_wire_on_disconnect: Literal["continue", "cancel"] = Field(
        default="cancel", description="what a dropped chat-completions stream does to its turn"
    )
    openai_wire_extra_fields: Literal["forward", "reject"] = Field(
        default="forward", description="unknown chat-completions body fields: sent on, or a 400"
    )
    openai_wire_max_n: int = Field(default=16, ge=1, le=128, description="largest n (choices)")
    # responses
    responses_max_input_items: int = Field(
        default=2048, ge=1, description="items of a /v1/responses input; more → 400"
    )
    responses_on_disconnect: Literal["cancel", "continue"] = Field(
        default="cancel", description="a foreground streamed response whose client leaves"
    )
    # (end of the OpenAI wire settings)

    # -- providers and agents (issue 14): add settings of that area below --------------------
    providers: dict[str, ProviderConfig] = Field(
        default_factory=dict, description="JSON: name → {base_url, api_key_env, models, ...}")
    offline_providers: bool = Field(default=True, description="serve offline-a, offline-b, offline-c")
    default_provider: str | None = Field(
        default=None, description="provider of a bare model id; default: first configured, else offline-a")
    provider_list_timeout_s: float = Field(default=10.0, gt=0, description="listing models at start")
    router_model: str | None = Field(
        default=None, description="provider/model deciding routes; unset: the built-in rules")
    agents: list[AgentConfig] = Field(default_factory=list, description="JSON: sub-agents")
    max_agent_depth: int = Field(default=2, ge=0, description="nested delegation depth; 0 = none")
    advisor_model: str | None = Field(default=None, description="provider/model advising after each step")
    advisor_max_redirects: int = Field(default=1, ge=0, description="redirects per response")
    prices: dict[str, PriceConfig] = Field(default_factory=dict, description="JSON: over the bundled file")
    prices_file: Path | None = Field(default=None, description="default: the bundled prices.json")

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        return check_provider_names(value)

    @field_validator("agents")
    @classmethod
    def _agent_names(cls, value: list[AgentConfig]) -> list[AgentConfig]:
        return check_agent_names(value)
    # (end of the agents settings)

    # -- the distributed log (issue 13): add settings of that area below -------------------
    event_log: str = Field(default="memory", description="memory, or redis://host:port/db")
    redis_prefix: str = Field(default="agentflow", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                              description="before every Redis key and channel")
    event_log_ttl_s: int = Field(default=3600, ge=1, description="a finished turn's stream expires")
    event_log_live_ttl_s: int = Field(default=86_400, ge=60, description="a live stream, renewed")
    event_log_retry_base_s: float = Field(default=0.05, gt=0, description="first append retry")
    event_log_retry_max_s: float = Field(default=2.0, gt=0, description="longest append retry wait")
    event_log_give_up_s: float = Field(default=300.0, gt=0, description="unappended finished turn")
    event_log_ping_s: float = Field(default=1.0, gt=0, description="Redis health and restart check")
    event_log_batch_max: int = Field(default=512, ge=1, description="events of a turn per append")
    event_log_timeout_s: float = Field(default=2.0, gt=0, description="Redis connect and command")
    event_log_lost_s: float = Field(default=5.0, gt=0, description="a vanished stream ends followers")

    @field_validator("event_log")
    @classmethod
    def _event_log_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("EVENT_LOG must be 'memory' or a redis:// URL")
        return value

    @property
    def redis_log(self) -> bool:
        """True when the event log is Redis (``EVENT_LOG=redis://…``)."""
        return self.event_log != "memory"
    # (end of the distributed log settings)

    # -- workers, leases, the supervisor (issue 13, branch workers): add settings below ------
    workers: int = Field(default=1, ge=1, le=64, description="worker processes on one port; > 1 needs Redis")
    reuse_port: bool = Field(default=False, description="listen with SO_REUSEPORT (set for workers)")
    turn_lease_s: float = Field(default=3.0, ge=0.2, le=300, description="a turn owner's lease, renewed")
    remote_cancel_timeout_s: float = Field(
        default=5.0, gt=0, description="a cancel sent to another worker waits this long for it")
    worker_restart_max_s: float = Field(default=5.0, gt=0, description="longest wait before a restart")

    @field_validator("workers")
    @classmethod
    def _workers_need_redis(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("event_log", "memory") == "memory":
            raise ValueError(f"{value} workers need EVENT_LOG=redis://… (they share the turns "
                             "through it); set it, or run one worker")
        return value
    # (end of the workers settings)

    # -- the recorder and the worker role (issue 13, branch recorder): settings below -------
    role: Literal["single", "worker", "recorder"] = Field(
        default="single", description="single: one process does all (today's server); "
        "recorder: the only process that opens DB_PATH, fed from the Redis log, with an "
        "internal API on RECORDER_PORT; worker: serves the API, its store is the recorder's")
    recorder_port: int = Field(default=8091, ge=0, le=65535,
                               description="the recorder's internal API port (loopback only)")
    recorder_url: str = Field(default="http://127.0.0.1:8091",
                              description="where a worker finds the recorder's internal API")
    recorder_token: str | None = Field(
        default=None, min_length=16, repr=False,
        description="Bearer key of the recorder's internal API (workers send it); "
        "--workers N makes a new one per start when unset")
    recorder_consumer: str = Field(default="recorder", min_length=1,
                                   description="the recorder's name in its consumer group; "
                                   "the same across restarts, so its pending entries are re-read")
    recorder_claim_idle_s: float = Field(default=30.0, ge=0, description="another consumer's "
                                         "entries idle this long are claimed on start")
    recorder_lost_s: float = Field(default=60.0, gt=0, description="a turn whose stream is "
                                   "missing this long is closed as interrupted")
    recorder_timeout_s: float = Field(default=10.0, gt=0, description="a worker's wait for the "
                                      "recorder (catching up, then answering)")
    recorder_poll_s: float = Field(default=1.0, gt=0, description="how often a worker polls "
                                   "the recorder's health")
    recorder_redis_connections: int = Field(default=32, ge=2, description="the recorder's Redis "
                                            "connections; its reads of every live turn share them")
    recorder_read_gap_s: float = Field(default=0.0, ge=0, le=5, description="the recorder "
                                       "reads a live turn at most this often (0: each event)")
    recorder_read_count: int = Field(default=128, ge=1, le=10_000, description="most entries "
                                     "of one live turn one read of the recorder takes")
    recorder_read_streams: int = Field(default=256, ge=1, le=10_000, description="most live "
                                       "turns' streams in one XREAD of the recorder")

    @model_validator(mode="after")
    def _role_needs_redis(self) -> Settings:
        if self.role != "single" and not self.redis_log:
            raise ValueError(f"ROLE={self.role} needs EVENT_LOG=redis://… (the log feeds the "
                             "recorder)")
        return self
    # (end of the recorder settings)

    @property
    def lake_dir(self) -> Path:
        """Where Parquet exports go: ``EXPORT_DIR``, else ``lake/`` beside the DuckDB file."""
        return self.export_dir if self.export_dir is not None else self.db_path.parent / "lake"
