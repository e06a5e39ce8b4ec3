"""Fan-out: N concurrent turns, each followed by one SSE client, vs a bare aiohttp SSE handler.

Both servers run as real separate processes on loopback, so the clients (all in this process,
one ``aiohttp.ClientSession`` with ``TCPConnector(limit=0)``) never share an event loop with
them:

- ours: ``python server.py --port P --db <tmp>`` with ``OFFLINE_TOKEN_DELAY_MS`` (default 50 ms,
  i.e. 20 tokens/s) and the default ``FLUSH_INTERVAL_MS``. Each client POSTs
  ``/v1/orchestrate`` with ``max_tokens`` (default 100, so a turn lasts about 5 s) and reads
  the native stream directly. The whole chain runs: offline model over HTTP (in the same
  process unless ``--external-model``), harnesses, Rx chain, DuckDB sink, SSE writer.
- bare: ``python bench/fanout_bench.py --bare-server --port P``, a plain aiohttp handler that
  per request writes the same frames (``retry:`` + comment, then the same ids, event types and
  JSON shape with ``ts``) at the same pace (``asyncio.sleep`` of the token delay before each
  text): no Rx, no store, no model.

For each N in ``--streams`` (default 100, 500, 1000) the N requests are started over
``--ramp-s`` (default 1 s), the bare variant first, then ours, each against its already
running server. Measured per phase:

- events/s delivered: SSE events received by all clients / (last receipt − first POST);
- lost: for ours, every client's ids are compared with the stored turn (after the run, from the
  DuckDB file: count = max seq = ``done``'s seq, and the client must have exactly the stored
  ``public`` seqs); a sample is also compared with ``GET /v1/requests/{id}/events?trace=false``
  while the server runs. For bare, with the ids it is known to write. Also: clients without
  ``done`` (errors, or cut at ``--timeout-s``) and texts != ``max_tokens``;
- latency from event creation (``data.ts``) to client receipt (``time.time()`` when the chunk
  holding the frame arrives): p50 / p99 / max over every event received;
- turn duration seen by the client (POST → ``done``), nominal ``max_tokens`` × token delay;
- server CPU (``/proc/<pid>/stat`` utime+stime over the phase; 100 % = one core) and RSS
  (``VmRSS`` before/after, ``VmHWM`` peak); this process's CPU and its event-loop lag (the
  client side shares the 2 cores and its lag inflates both variants' latencies alike); the
  CPU every *other* process on the machine used meanwhile (``/proc/stat`` minus ours) and the
  CPU pressure (PSI ``some``: the share of the time a runnable task waited for a core), so a
  busy machine shows in the figures instead of passing for a slow server.

Printed: one table for both variants, the ratios ours/bare (p99 latency, events/s) and where
each variant bends (the first N with p99 > 100 ms or anything lost or incomplete). No figure
is asserted.

With ``--server-env MAX_LIVE_TURNS=150`` (any setting, repeatable; ours only) the server
sheds the excess at the door: refused turns (``503``/``429`` with ``Retry-After``) are
counted apart ("refused", with how fast the refusal came), and every other figure is of the
admitted turns only (issue 10).

With ``--workers 1,2`` (issue 13) the same phases also run against ``server.py
--workers W --event-log <--redis-url>`` for each W (variants ``w1``, ``w2``: one process, or
a supervisor with W workers on one port, each with its own DuckDB file until the recorder),
beside the embedded single process (``ours``, ``EVENT_LOG=memory``) and the bare handler.
The kernel spreads the clients' connections over the workers (``SO_REUSEPORT``); a turn is
run by the worker its POST reached. Server CPU is then the sum over the supervisor and its
workers, "CPU µs/event" divides it by the events delivered, and "Redis CPU" is the
``used_cpu_user + used_cpu_sys`` that Redis's ``INFO cpu`` gained over the phase (that Redis
may serve other programs too: the figure is an upper bound). The replay sample goes through
the shared port, so a turn run by one worker may be replayed by the other, from Redis.

Run: ``python bench/fanout_bench.py [--streams 100,500,1000] [--max-tokens 100]
[--token-delay-ms 50] [--ramp-s 1] [--timeout-s 45] [--external-model]
[--server-env NAME=VALUE …] [--workers 1,2 [--redis-url URL] [--redis-prefix P]]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
P99_TARGET_MS = 100.0
TRACE_SEQS = 3  # route, memory, llm_call: seq 2..4, hidden with trace false
CLK_TCK = os.sysconf("SC_CLK_TCK")
REFUSED = (429, 503)  # shed at the door, with Retry-After


# -- file descriptors ------------------------------------------------------------------------
def raise_nofile() -> None:
    """Raise the soft fd limit to the hard one (clients here, 1–3 sockets per turn there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# -- the bare baseline server ----------------------------------------------------------------
def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _frame(seq: int, kind: str, data: dict[str, Any]) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {_dumps(data)}\n\n".encode()


async def bare_orchestrate(request: web.Request) -> web.StreamResponse:
    """The same native frames as ``POST /v1/orchestrate`` (trace false), nothing behind them."""
    delay = request.app[BARE_DELAY]
    body = await request.json()
    tokens = int(body.get("max_tokens") or 100)
    request_id = f"req_{os.urandom(12).hex()}"
    conversation_id = f"conv_{os.urandom(12).hex()}"
    started = time.monotonic()
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "Connection": "keep-alive", "X-Accel-Buffering": "no", "X-Request-Id": request_id,
    })
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n: stream open\n\n")

    def head(seq: int, kind: str) -> dict[str, Any]:
        return {"request_id": request_id, "seq": seq, "ts": time.time(), "type": kind}

    await response.write(_frame(1, "request_received", {
        **head(1, "request_received"), "agent": "assistant", "conversation_id": conversation_id}))
    seq = 2 + TRACE_SEQS  # the trace-only events take seq 2..4 in ours
    await response.write(_frame(seq, "stream_start", {
        **head(seq, "stream_start"), "stream_id": 1, "agent": "assistant", "depth": 0,
        "parent_stream_id": None}))
    for i in range(tokens):
        await asyncio.sleep(delay)
        seq += 1
        await response.write(_frame(seq, "text", {
            **head(seq, "text"), "stream_id": 1, "delta": f" tok{i % 10}"}))
    seq += 1
    await response.write(_frame(seq, "token_usage", {
        **head(seq, "token_usage"), "stream_id": 1, "model": "offline", "prompt_tokens": 4,
        "completion_tokens": tokens, "total_tokens": tokens + 4}))
    seq += 1
    await response.write(_frame(seq, "stream_end", {
        **head(seq, "stream_end"), "stream_id": 1, "status": "ok", "finish_reason": "length"}))
    seq += 1
    await response.write(_frame(seq, "done", {
        **head(seq, "done"), "ok": True,
        "duration_ms": round((time.monotonic() - started) * 1000, 3), "reason": "completed"}))
    await response.write_eof()
    return response


async def bare_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


BARE_DELAY = web.AppKey("delay", float)


async def run_bare_server(port: int, delay_ms: float) -> None:
    app = web.Application()
    app[BARE_DELAY] = delay_ms / 1000
    app.router.add_post("/v1/orchestrate", bare_orchestrate)
    app.router.add_get("/healthz", bare_healthz)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"bare server on 127.0.0.1:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


# -- server processes ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def machine_busy_s() -> float:
    """CPU seconds all processes used (every core), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_pressure_s() -> float | None:
    """Seconds some runnable task waited for a CPU (PSI ``some`` total), if the kernel has it."""
    try:
        with open("/proc/pressure/cpu") as fh:
            for line in fh:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1]) / 1e6
    except OSError:
        pass
    return None


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (a supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo.extend(int(child) for child in fh.read().split())
    return out


def tree_cpu_s(pid: int) -> float:
    """utime + stime summed over a process tree (children that exited are not counted)."""
    total = 0.0
    for one in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += proc_cpu_s(one)
    return total


def recorder_cpu_s(pid: int) -> float | None:
    """utime + stime of the recorder in a supervisor's tree (``--role recorder`` on its
    command line), or None when the tree has none."""
    for one in tree_pids(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{one}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            if b"--role" in argv and argv[argv.index(b"--role") + 1:][:1] == [b"recorder"]:
                return proc_cpu_s(one)
    return None


def tree_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) summed over a process tree, in MB."""
    rss = hwm = 0.0
    for one in tree_pids(pid):
        with contextlib.suppress(OSError):
            r, h = proc_mem_mb(one)
            rss, hwm = rss + r, hwm + h
    return rss, hwm


def redis_cpu_s(url: str | None) -> float | None:
    """Redis's own CPU seconds so far (``INFO cpu``: user + sys), or None."""
    if not url:
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            info = client.info("cpu")
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    db_path: Path | None = None
    db_paths: list[Path] = field(default_factory=list)  # every DuckDB file (one per worker)
    redis_url: str | None = None  # its event log (the w1, w2 variants)
    workers: int = 0  # 0: not a supervisor (bare, ours, w1)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_process(name: str, argv: list[str], env: dict[str, str], log_path: Path,
                  port: int, db_path: Path | None = None) -> Server:
    log = open(log_path, "wb")  # the child keeps its own descriptor
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=raise_nofile)
    log.close()
    return Server(name, proc, port, log_path, db_path)


async def wait_ready(session: aiohttp.ClientSession, server: Server, path: str,
                     timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.proc.returncode}; "
                             f"log:\n{server.log_path.read_text()[-3000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(server.base + path) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{server.name} not ready after {timeout_s:.0f} s")


def stop_process(server: Server, timeout_s: float = 30.0) -> int | None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"  {server.name} did not stop in {timeout_s:.0f} s after SIGTERM; killed",
                  file=sys.stderr)
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


# -- clients ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Client:
    request_id: str | None = None
    status: int | None = None
    error: str | None = None
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    texts: int = 0
    done_seq: int | None = None
    done_ok: bool | None = None
    comments: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    last_receipt: float = 0.0


async def follow(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 start_at: float, client: Client) -> None:
    """POST, then read the native stream to its end, stamping each frame on receipt."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    client.started = time.time()
    try:
        async with session.post(url, json=body) as resp:
            client.status = resp.status
            client.request_id = resp.headers.get("X-Request-Id")
            if resp.status != 200:
                client.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.time()
                buf += chunk
                if b"\n\n" not in buf:
                    continue
                *frames, buf = buf.split(b"\n\n")
                for frame in frames:
                    parse_frame(frame, now, client)
                client.last_receipt = now
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        client.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.finished = time.time()


def parse_frame(frame: bytes, now: float, client: Client) -> None:
    data: dict[str, Any] | None = None
    for line in frame.split(b"\n"):
        if line.startswith(b"data: "):
            data = json.loads(line[6:])
        elif line.startswith(b": "):
            client.comments.append(line[2:].decode(errors="replace"))
    if data is None:
        return
    client.ids.append(data["seq"])
    client.latencies.append(now - data["ts"])
    kind = data["type"]
    if kind == "text":
        client.texts += 1
    elif kind == "done":
        client.done_seq = data["seq"]
        client.done_ok = data["ok"]


async def loop_lag(samples: list[float], stop: asyncio.Event, period_s: float = 0.01) -> None:
    """How late a short sleep wakes in this (client) process."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(period_s)
        samples.append(loop.time() - t - period_s)


# -- one phase: N turns against one server ---------------------------------------------------
@dataclass
class Phase:
    variant: str
    n: int
    clients: list[Client]
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    rss_before: float
    rss_after: float
    hwm: float
    lag: list[float]
    model_cpu_s: float | None = None
    others_cpu_s: float = 0.0
    pressure_s: float | None = None
    health: dict[str, Any] | None = None
    replay_checked: int = 0
    replay_mismatch: list[str] = field(default_factory=list)
    lost: int = 0
    store_problems: list[str] = field(default_factory=list)
    timed_out: int = 0
    redis_cpu_s: float | None = None
    recorder_cpu_s: float | None = None  # the recorder's part of server_cpu_s (w1, w2)

    @property
    def recorder_us_per_event(self) -> float:
        if self.recorder_cpu_s is None or not self.events:
            return float("nan")
        return self.recorder_cpu_s / self.events * 1e6

    @property
    def cpu_us_per_event(self) -> float:
        return self.server_cpu_s / self.events * 1e6 if self.events else float("nan")

    @property
    def events(self) -> int:
        return sum(len(c.ids) for c in self.clients)

    @property
    def incomplete(self) -> int:
        return sum(1 for c in self.clients if c.done_seq is None and c.status not in REFUSED)

    @property
    def errors(self) -> int:
        return sum(1 for c in self.clients if c.error is not None and c.status not in REFUSED)

    @property
    def refused(self) -> int:
        """Turns shed at the door (503 overloaded, 429 rate limited): not errors."""
        return sum(1 for c in self.clients if c.status in REFUSED)

    def refusal_ms(self) -> float:
        """p99 time from POST to the refusal."""
        times = sorted(c.finished - c.started for c in self.clients if c.status in REFUSED)
        return times[int(0.99 * (len(times) - 1))] * 1000 if times else float("nan")

    def bad_texts(self, tokens: int) -> int:
        return sum(1 for c in self.clients if c.done_seq is not None and c.texts != tokens)

    def latency_ms(self) -> tuple[float, float, float]:
        values = sorted(v for c in self.clients for v in c.latencies)
        if not values:
            return float("nan"), float("nan"), float("nan")

        def pct(p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000

        return pct(0.50), pct(0.99), values[-1] * 1000

    def turn_s(self) -> tuple[float, float]:
        durations = [c.finished - c.started for c in self.clients if c.done_seq is not None]
        if not durations:
            return float("nan"), float("nan")
        return statistics.median(durations), max(durations)

    @property
    def events_per_s(self) -> float:
        first = min((c.started for c in self.clients if c.started), default=0.0)
        last = max((c.last_receipt for c in self.clients), default=0.0)
        return self.events / (last - first) if last > first else 0.0

    def bends(self, tokens: int) -> list[str]:
        why = []
        p99 = self.latency_ms()[1]
        if p99 > P99_TARGET_MS:
            why.append(f"p99 {p99:.0f} ms")
        if self.lost:
            why.append(f"{self.lost} lost")
        if self.incomplete:
            why.append(f"{self.incomplete} without done")
        if self.bad_texts(tokens):
            why.append(f"{self.bad_texts(tokens)} with texts != {tokens}")
        if self.replay_mismatch:
            why.append(f"{len(self.replay_mismatch)} replay mismatches")
        return why


async def run_phase(session: aiohttp.ClientSession, server: Server, variant: str, n: int,
                    args: argparse.Namespace, everyone: list[Server],
                    model: Server | None = None) -> Phase:
    """Start ``n`` turns over the ramp, each followed by one client, until all end or the
    deadline; CPU of the server (and the model), this process and everything else."""
    url = server.base + "/v1/orchestrate"
    clients = [Client() for _ in range(n)]
    loop = asyncio.get_running_loop()
    pid = server.proc.pid
    rss_before, _ = tree_mem_mb(pid)
    cpu0, model_cpu0 = tree_cpu_s(pid), (proc_cpu_s(model.proc.pid) if model else 0.0)
    rec0 = recorder_cpu_s(pid)
    redis0 = redis_cpu_s(server.redis_url)
    own0 = sum(os.times()[:2])
    ours0 = sum(tree_cpu_s(s.proc.pid) for s in everyone)
    machine0, pressure0 = machine_busy_s(), cpu_pressure_s()
    lag: list[float] = []
    stop_lag = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lag, stop_lag))
    wall0 = time.monotonic()
    t0 = loop.time() + 0.05
    tasks = [
        asyncio.create_task(follow(session, url, {
            "messages": [{"role": "user", "content": f"fan-out {variant} {n} #{i}"}],
            "max_tokens": args.max_tokens, "trace": False,
            # A client cut at the deadline cancels its turn, so no load leaks into the next phase.
            "on_disconnect": "cancel",
        }, t0 + args.ramp_s * i / n, client))
        for i, client in enumerate(clients)
    ]
    deadline = wall0 + args.ramp_s + args.timeout_s
    next_report = wall0 + 2.0
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        now = time.monotonic()
        if now >= next_report or not pending:
            got = sum(len(c.ids) for c in clients)
            print(f"  {variant:<4} N={n:<5} {now - wall0:5.1f} s  {n - len(pending):>5}/{n} "
                  f"finished  {got:>7} events  server CPU "
                  f"{(tree_cpu_s(pid) - cpu0) / (now - wall0) * 100:4.0f} %",
                  file=sys.stderr, flush=True)
            next_report = now + 2.0
        if pending and now >= deadline:
            print(f"  {variant} N={n}: {len(pending)} clients still streaming after "
                  f"{args.timeout_s:.0f} s (--timeout-s); cutting them", file=sys.stderr)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            break
    timed_out = len(pending)
    wall = time.monotonic() - wall0
    server_cpu = tree_cpu_s(pid) - cpu0
    rec1 = recorder_cpu_s(pid)
    model_cpu = proc_cpu_s(model.proc.pid) - model_cpu0 if model else None
    redis1 = redis_cpu_s(server.redis_url)
    client_cpu = sum(os.times()[:2]) - own0
    others = (machine_busy_s() - machine0) - (sum(tree_cpu_s(s.proc.pid) for s in everyone)
                                              - ours0) - client_cpu
    pressure1 = cpu_pressure_s()
    pressure = pressure1 - pressure0 if pressure0 is not None and pressure1 is not None else None
    stop_lag.set()
    await lag_task
    rss_after, hwm = tree_mem_mb(pid)
    return Phase(variant, n, clients, wall, server_cpu, client_cpu, rss_before, rss_after, hwm,
                 lag, model_cpu_s=model_cpu, others_cpu_s=max(0.0, others),
                 pressure_s=pressure, timed_out=timed_out,
                 redis_cpu_s=redis1 - redis0 if redis0 is not None and redis1 is not None
                 else None,
                 recorder_cpu_s=rec1 - rec0 if rec0 is not None and rec1 is not None else None)


async def settle_health(session: aiohttp.ClientSession, server: Server,
                        timeout_s: float = 30.0) -> dict[str, Any]:
    """Our /healthz once no turn, client or subscription is left (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    idle: set[str] = set()  # with workers: every worker must be seen idle
    while time.monotonic() < deadline:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) \
                as fresh, fresh.get(server.base + "/healthz") as resp:
            health = await resp.json()
        quiet = not health["live_turns"] and not health["clients"]["open"] \
            and not health["turn_subscribers"]
        worker = str(health.get("worker"))
        if quiet:
            idle.add(worker)
        else:
            idle.discard(worker)
        if quiet and {str(w["id"]) for w in health.get("workers", [])} <= idle:
            break
        await asyncio.sleep(0.1 if quiet else 0.25)
    return health


async def check_replay(session: aiohttp.ClientSession, server: Server, phase: Phase,
                       sample: int) -> None:
    """Compare a sample of clients with ``GET /v1/requests/{id}/events?trace=false``."""
    done = [c for c in phase.clients if c.request_id and c.done_seq is not None]
    for client in random.Random(phase.n).sample(done, min(sample, len(done))):
        replay = Client()
        await _get_stream(session, f"{server.base}/v1/requests/{client.request_id}/events"
                          "?trace=false", replay)
        phase.replay_checked += 1
        if replay.ids != client.ids:
            phase.replay_mismatch.append(
                f"{client.request_id}: live {len(client.ids)} ids, replay {len(replay.ids)} "
                f"(missing live {sorted(set(replay.ids) - set(client.ids))[:10]})")


async def _get_stream(session: aiohttp.ClientSession, url: str, client: Client) -> None:
    async with session.get(url) as resp:
        client.status = resp.status
        buf = await resp.read()
    now = time.time()
    for frame in buf.split(b"\n\n"):
        if frame:
            parse_frame(frame, now, client)


def check_store(db_paths: list[Path], phases: list[Phase]) -> None:
    """After our server stopped: every turn fully stored, every client got its public events
    (with workers: in the file of the worker that ran it)."""
    import duckdb

    rows = []
    for db_path in db_paths:
        if not db_path.exists():
            continue
        con = duckdb.connect(str(db_path), read_only=True)
        try:
            rows += con.execute(
                "SELECT request_id, count(*), max(seq), "
                "list(seq ORDER BY seq) FILTER (WHERE visibility = 'public') "
                "FROM events GROUP BY request_id").fetchall()
        finally:
            con.close()
    stored = {r[0]: (r[1], r[2], r[3] or []) for r in rows}
    for phase in phases:
        for client in phase.clients:
            if client.request_id is None:
                continue  # never answered: counted as an error / without done
            if client.request_id not in stored:
                phase.store_problems.append(f"{client.request_id}: nothing stored")
                continue
            count, max_seq, public = stored[client.request_id]
            if count != max_seq or (client.done_seq is not None and client.done_seq != max_seq):
                phase.store_problems.append(
                    f"{client.request_id}: stored {count} rows, max seq {max_seq}, "
                    f"done seq {client.done_seq}")
            if client.done_seq is not None:  # a cut client is counted as incomplete, not lost
                phase.lost += len(set(public) - set(client.ids))
            if client.ids != sorted(set(client.ids)):
                phase.store_problems.append(f"{client.request_id}: ids out of order or repeated")


def check_bare(phase: Phase, tokens: int) -> None:
    expected = [1, *range(2 + TRACE_SEQS, 2 + TRACE_SEQS + tokens + 4)]
    for client in phase.clients:
        if client.done_seq is not None:
            phase.lost += len(set(expected) - set(client.ids))


# -- report ----------------------------------------------------------------------------------
def fmt(value: float, spec: str = ".0f") -> str:
    return "—" if value != value else format(value, spec)  # NaN → dash


def report(phases: list[Phase], args: argparse.Namespace, servers: dict[str, Server],
           final_rss: dict[str, tuple[float, float]], logs: dict[str, list[str]],
           load: tuple[float, float, float]) -> None:
    tokens = args.max_tokens
    nominal = tokens * args.token_delay_ms / 1000
    per_turn = tokens + 5  # request_received, stream_start, texts, token_usage, stream_end, done
    print()
    print(f"Fan-out: N turns × 1 SSE client each, {tokens} tokens at "
          f"{1000 / args.token_delay_ms:.0f} tokens/s (turn ≈ {nominal:.1f} s), "
          f"{per_turn} visible events per turn, ramp {args.ramp_s:g} s; "
          f"{os.cpu_count()} cores, load average before {load[0]:.2f}")
    print("Both servers are separate processes; the clients (this process) share the same "
          "cores, so their CPU and loop lag weigh on both variants' latencies.")
    if args.external_model:
        print("ours: the offline model runs in its own process (--external-model); its CPU is "
              "shown apart.")
    else:
        print("ours: the offline model runs inside the server process (OFFLINE_TOKEN_DELAY_MS), "
              "so the server CPU includes serving and parsing the model stream.")
    head = (f"{'variant':<5} {'N':>5} {'events/s':>9} {'lost':>5} {'no done':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'turn s p50/max':>14} "
            f"{'srv CPU':>8} {'µs/ev':>6} {'Redis':>6} {'RSS MB before→after (peak)':>27} {'client CPU':>10} "
            f"{'client lag p99':>14} {'others CPU':>10} {'CPU pressure':>12}")
    print(head)
    print("-" * len(head))
    shed = [p for p in phases if p.refused]
    for phase in phases:
        p50, p99, mx = phase.latency_ms()
        t50, tmax = phase.turn_s()
        lag99 = sorted(phase.lag)[int(0.99 * (len(phase.lag) - 1))] * 1000 if phase.lag else 0
        srv = f"{phase.server_cpu_s / phase.wall_s * 100:.0f} %"
        if phase.model_cpu_s is not None:
            srv += f"+{phase.model_cpu_s / phase.wall_s * 100:.0f}"
        rss = f"{phase.rss_before:.0f}→{phase.rss_after:.0f} ({phase.hwm:.0f})"
        redis_pct = (f"{phase.redis_cpu_s / phase.wall_s * 100:.0f} %"
                     if phase.redis_cpu_s is not None else "—")
        print(f"{phase.variant:<5} {phase.n:>5} {phase.events_per_s:>9,.0f} {phase.lost:>5} "
              f"{phase.incomplete:>7} {fmt(p50):>7} {fmt(p99):>7} {fmt(mx):>7} "
              f"{fmt(t50, '.2f') + '/' + fmt(tmax, '.2f'):>14} {srv:>8} "
              f"{fmt(phase.cpu_us_per_event):>6} {redis_pct:>6} {rss:>27} "
              f"{phase.client_cpu_s / phase.wall_s * 100:>8.0f} % {lag99:>11.1f} ms "
              f"{phase.others_cpu_s / phase.wall_s * 100:>8.0f} % "
              f"{fmt((phase.pressure_s or float('nan')) / phase.wall_s * 100):>10} %")
    print("(events/s = events received / (last receipt − first POST); ideal ≈ "
          f"N × {per_turn} / ({nominal:.1f} + {args.ramp_s:g}) s. CPU: 100 % = one core. "
          "Latency: data.ts → client receipt, all events. others CPU: every other process on "
          "the machine; CPU pressure: share of the time some task waited for a core, PSI. "
          "µs/ev: server CPU (summed over a supervisor and its workers) per event delivered; "
          "Redis: the Redis server's CPU (INFO cpu) over the phase.)")
    for phase in shed:
        admitted = phase.n - phase.refused
        print(f"  {phase.variant} N={phase.n}: {admitted} admitted, {phase.refused} refused at "
              f"the door (503/429, p99 {fmt(phase.refusal_ms())} ms to the refusal); the row "
              "above is the admitted turns only")
    print()
    print(f"{'N':>5} {'p99 ours/bare':>14} {'events/s ours/bare':>19} {'srv CPU ours/bare':>18}")
    by = {(p.variant, p.n): p for p in phases}
    for n in args.streams:
        ours, bare = by.get(("ours", n)), by.get(("bare", n))
        if ours is None or bare is None:
            continue
        p99o, p99b = ours.latency_ms()[1], bare.latency_ms()[1]
        cpu_o, cpu_b = ours.server_cpu_s / ours.wall_s, bare.server_cpu_s / bare.wall_s
        print(f"{n:>5} {fmt(p99o / p99b, '.2f') + '×':>14} "
              f"{ours.events_per_s / bare.events_per_s if bare.events_per_s else float('nan'):>18.2f}× "
              f"{cpu_o / cpu_b if cpu_b else float('nan'):>17.1f}×")
    workers = [v for v in dict.fromkeys(p.variant for p in phases) if v.startswith("w")]
    if workers:
        print()
        print(f"{'N':>5} " + " ".join(
            f"{v + ' events/s /w1':>17} {v + ' µs/ev /ours':>16} {v + ' recorder µs/ev':>18}"
            for v in workers))
        for n in args.streams:
            base, ours = by.get(("w1", n)), by.get(("ours", n))
            cells = []
            for v in workers:
                ph = by.get((v, n))
                if ph is None:
                    continue
                speed = ph.events_per_s / base.events_per_s if base and base.events_per_s \
                    else float("nan")
                cost = ph.cpu_us_per_event / ours.cpu_us_per_event if ours else float("nan")
                cells.append(f"{fmt(speed, '.2f') + '×':>17} {fmt(cost, '.2f') + '×':>16} "
                             f"{fmt(ph.recorder_us_per_event):>18}")
            print(f"{n:>5} " + " ".join(cells))
    print()
    for variant in dict.fromkeys(p.variant for p in phases):
        bent = [(p.n, p.bends(tokens)) for p in phases if p.variant == variant]
        first = next(((n, why) for n, why in bent if why), None)
        if first is None:
            print(f"{variant}: does not bend up to N={max(args.streams)} "
                  f"(p99 ≤ {P99_TARGET_MS:.0f} ms, nothing lost)")
        else:
            print(f"{variant}: bends at N={first[0]}: {', '.join(first[1])}")
    ours_max = [p for p in phases if p.variant == "ours" and p.n == 1000]
    if ours_max:
        p = ours_max[0]
        met = not p.bends(tokens)
        print(f"target (1,000 streams at 20 tokens/s, p99 < {P99_TARGET_MS:.0f} ms, 0 lost): "
              f"{'MET' if met else 'NOT MET'}")
    if "w1" in workers and "w2" in workers:
        for n in args.streams:
            one, two = by.get(("w1", n)), by.get(("w2", n))
            if one is None or two is None or not one.events_per_s:
                continue
            speed = two.events_per_s / one.events_per_s
            met = speed >= 1.6 and two.latency_ms()[1] < P99_TARGET_MS and not two.bends(tokens)
            print(f"workers target at N={n} (w2 ≥ 1.6× w1's events/s at p99 < "
                  f"{P99_TARGET_MS:.0f} ms, nothing lost): {speed:.2f}×, p99 "
                  f"{fmt(two.latency_ms()[1])} ms: {'MET' if met else 'NOT MET'}")
    print()
    print("checks:")
    for phase in phases:
        notes = []
        if phase.errors:
            first_error = next(c.error for c in phase.clients if c.error)
            notes.append(f"{phase.errors} client errors (first: {first_error})")
        if phase.timed_out:
            notes.append(f"{phase.timed_out} cut at --timeout-s")
        if phase.bad_texts(tokens):
            notes.append(f"{phase.bad_texts(tokens)} turns with texts != {tokens}")
        not_ok = sum(1 for c in phase.clients if c.done_ok is False)
        if not_ok:
            notes.append(f"{not_ok} done ok=false")
        cut = [c for c in phase.clients if any("reconnect" in m for m in c.comments)]
        if cut:
            notes.append(f"{len(cut)} clients cut off as slow")
        if phase.variant != "bare":
            notes.append(f"replay sample {phase.replay_checked - len(phase.replay_mismatch)}/"
                         f"{phase.replay_checked} identical")
            notes.extend(phase.replay_mismatch[:3])
            notes.append("store: every turn complete, client ids = stored public seqs"
                         if not phase.store_problems else
                         f"store: {len(phase.store_problems)} problems, e.g. "
                         f"{'; '.join(phase.store_problems[:3])}")
            if phase.health:
                h = phase.health
                notes.append(f"after: live_turns {h['live_turns']}, clients open "
                             f"{h['clients']['open']}, cut_off {h['clients']['cut_off']}, "
                             f"turn_subscribers {h['turn_subscribers']}, store failed_flushes "
                             f"{h['store']['failed_flushes']}")
        print(f"  {phase.variant:<4} N={phase.n:<5} " + "; ".join(notes or ["ok"]))
    for name, (rss_mb, hwm_mb) in final_rss.items():
        print(f"  {name} server RSS at the end, idle: {rss_mb:.0f} MB (peak {hwm_mb:.0f} MB)")
    for name, lines in logs.items():
        if lines:
            print(f"  {name} server log: warnings/errors:")
            for line in lines[:6]:
                print(f"    {line[:240]}")
        else:
            print(f"  {name} server log: no warnings or errors")


def log_problems(path: Path) -> list[str]:
    """Warning/error lines of a server log, grouped: ``count × message [→ exception]``."""
    lines = path.read_text(errors="replace").splitlines()
    found: dict[str, int] = {}
    current: str | None = None
    for index, line in enumerate(lines):
        level = next((k for k in (" WARNING ", " ERROR ", " CRITICAL ") if k in line), None)
        if level is not None:
            current = line.split(level, 1)[1].strip()
            # The exception that ends a traceback logged with it (the last unindented line).
            tail = None
            after = lines[index + 1:index + 300]
            for at, follow_line in enumerate(after):
                if follow_line[:4].isdigit():  # the next log record
                    break
                if follow_line and not follow_line.startswith((" ", "Traceback", "During", "The above")):
                    tail = follow_line  # an exception line; chained ones go on after a blank
                    nxt = after[at + 1] if at + 1 < len(after) else ""
                    if nxt and not nxt.startswith(("During", "Traceback", "The above")):
                        break
            key = f"{level.strip()} {current}" + (f" → {tail}" if tail else "")
            found[key] = found.get(key, 0) + 1
    return [f"{count} × {key}" for key, count in sorted(found.items(), key=lambda kv: -kv[1])]


# -- driver ----------------------------------------------------------------------------------
async def drive(args: argparse.Namespace, servers: dict[str, Server], model: Server | None,
                phases: list[Phase]) -> dict[str, tuple[float, float]]:
    """Warm up, then the phases (bare, then ours, for each N); returns the idle RSS at the end."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if model is not None:
            await wait_ready(session, model, "/v1/models")
        for server in servers.values():
            await wait_ready(session, server, "/healthz")
            if server.workers > 1:  # every worker listening
                await wait_workers(session, server)
        # Warm-up: a few turns each (imports, caches, the first DuckDB writes).
        for name in servers:
            warm = [Client() for _ in range(5 * max(1, servers[name].workers))]
            now = asyncio.get_running_loop().time()
            await asyncio.gather(*(follow(session, servers[name].base + "/v1/orchestrate",
                                          {"messages": [{"role": "user", "content": "warm"}],
                                           "max_tokens": 10}, now, c) for c in warm))
            bad = [c.error for c in warm if c.done_seq is None]
            if bad:
                raise SystemExit(f"{name}: warm-up failed: {bad[0]}")
        print("  warm-up done", file=sys.stderr, flush=True)
        everyone = [*servers.values(), *([model] if model is not None else [])]
        for n in args.streams:
            for name in servers:
                phase = await run_phase(session, servers[name], name, n, args, everyone,
                                        model if name != "bare" else None)
                if name != "bare":
                    phase.health = await settle_health(session, servers[name])
                    await check_replay(session, servers[name], phase, args.sample)
                else:
                    check_bare(phase, args.max_tokens)
                phases.append(phase)
                p50, p99, _ = phase.latency_ms()
                print(f"  {name} N={n}: {phase.events_per_s:,.0f} events/s, p50 {p50:.0f} "
                      f"ms, p99 {p99:.0f} ms, {phase.incomplete} without done, "
                      f"{phase.wall_s:.1f} s", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)  # let the store flush and the loop settle
        await asyncio.sleep(2.0)
        return {name: tree_mem_mb(server.proc.pid) for name, server in servers.items()}


async def wait_workers(session: aiohttp.ClientSession, server: Server,
                       timeout_s: float = 60.0) -> None:
    """Until ``/healthz`` lists every worker of a supervisor."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(server.base + "/healthz") as resp:
                if len((await resp.json()).get("workers", [])) >= server.workers:
                    return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{server.name}: {server.workers} workers not listed after {timeout_s:.0f} s")


def main(args: argparse.Namespace) -> None:
    raise_nofile()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fanout_bench_"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "DB_PATH", "FLUSH_INTERVAL_MS")}
    env["OFFLINE_TOKEN_DELAY_MS"] = f"{args.token_delay_ms:g}"
    env["PYTHONUNBUFFERED"] = "1"
    ours_env = {**env, **dict(item.split("=", 1) for item in args.server_env)}
    servers: dict[str, Server] = {}
    model: Server | None = None
    phases: list[Phase] = []
    try:
        if args.external_model:
            port = free_port()
            model = start_process("model", [sys.executable, "-m", "pipeline.offline_model",
                                            "--port", str(port), "--token-delay-ms",
                                            f"{args.token_delay_ms:g}"],
                                  env, tmp / "model.log", port)
            env = {**env, "OPENAI_BASE_URL": f"{model.base}/v1", "OPENAI_API_KEY": "offline"}
        port = free_port()
        servers["bare"] = start_process(
            "bare", [sys.executable, str(Path(__file__).resolve()), "--bare-server", "--port",
                     str(port), "--token-delay-ms", f"{args.token_delay_ms:g}"],
            env, tmp / "bare.log", port)
        port = free_port()
        db = tmp / "events.duckdb"
        servers["ours"] = start_process(
            "ours", [sys.executable, "server.py", "--port", str(port), "--db", str(db)],
            ours_env, tmp / "ours.log", port, db)
        servers["ours"].db_paths = [db]
        for count in args.workers:  # issue 13: the same server on Redis, W workers
            port = free_port()
            name = f"w{count}"
            wdb = tmp / f"{name}.duckdb"
            started = start_process(
                name, [sys.executable, "server.py", "--port", str(port), "--db", str(wdb),
                       "--event-log", args.redis_url, "--workers", str(count)],
                {**ours_env, "REDIS_PREFIX": f"{args.redis_prefix}-{name}"},
                tmp / f"{name}.log", port, wdb)
            started.redis_url, started.workers = args.redis_url, count
            started.db_paths = [wdb]  # the recorder's: the only process that opens it
            servers[name] = started
        print(f"fanout_bench: N in {args.streams}, {args.max_tokens} tokens every "
              f"{args.token_delay_ms:g} ms, ramp {args.ramp_s:g} s; servers ours pid "
              f"{servers['ours'].proc.pid}, bare pid {servers['bare'].proc.pid}; logs in {tmp}",
              file=sys.stderr, flush=True)
        final_rss = asyncio.run(drive(args, servers, model, phases))
    finally:
        codes = {name: stop_process(server) for name, server in servers.items()}
        if model is not None:
            stop_process(model)
    for name, code in codes.items():
        if code not in (0, -signal.SIGTERM):
            print(f"  {name} server exited with {code}", file=sys.stderr)
    for name, server in servers.items():
        if name != "bare":
            check_store(server.db_paths, [p for p in phases if p.variant == name])
    if args.workers:
        forget_prefixes(args.redis_url, [f"{args.redis_prefix}-w{c}" for c in args.workers])
    logs = {name: log_problems(server.log_path) for name, server in servers.items()}
    if model is not None:
        logs["model"] = log_problems(model.log_path)
    report(phases, args, servers, final_rss, logs, load)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)


def forget_prefixes(url: str, prefixes: list[str]) -> None:
    """Delete the bench's Redis keys."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start:start + 1000])
    finally:
        client.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="100,500,1000",
                        help="comma-separated N of concurrent turns (default 100,500,1000)")
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens per turn (100)")
    parser.add_argument("--token-delay-ms", type=float, default=50.0,
                        help="OFFLINE_TOKEN_DELAY_MS: 50 → 20 tokens/s per stream")
    parser.add_argument("--ramp-s", type=float, default=1.0,
                        help="start the N requests evenly over this many seconds (1)")
    parser.add_argument("--timeout-s", type=float, default=45.0,
                        help="cut clients still streaming this long after the ramp (45); "
                             "their turns are cancelled (on_disconnect: cancel)")
    parser.add_argument("--sample", type=int, default=20,
                        help="turns per phase compared with the replay endpoint (20)")
    parser.add_argument("--external-model", action="store_true",
                        help="run the offline model in its own process (OPENAI_BASE_URL) "
                             "instead of inside our server")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, DB)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for our server only, e.g. MAX_LIVE_TURNS=150 (repeatable)")
    parser.add_argument("--workers", default="",
                        help="also run server.py --workers W on Redis for each W, e.g. 1,2")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="the event log of the --workers variants")
    parser.add_argument("--redis-prefix", default=f"bench-{os.getpid()}",
                        help="REDIS_PREFIX of the --workers variants (+ -w1, -w2; deleted after)")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return args
    try:
        args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
    except ValueError:
        parser.error("--streams takes comma-separated integers, e.g. 100,500,1000")
    try:
        args.workers = [int(s) for s in args.workers.split(",") if s.strip()]
    except ValueError:
        parser.error("--workers takes comma-separated integers, e.g. 1,2")
    if not args.streams or min(args.streams) < 1 or args.max_tokens < 1:
        parser.error("need streams >= 1 and max-tokens >= 1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.bare_server:
        raise_nofile()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_bare_server(arguments.port, arguments.token_delay_ms))
    else:
        main(arguments)
