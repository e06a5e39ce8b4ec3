"""Hot path: streamed ``/v1/chat/completions`` through four variants, measured side by side.

Every variant is a real process on loopback, in front of the same upstream (the bundled
offline model, its own process, ``--token-delay-ms`` per token, default 50 = 20 tokens/s):

- direct: the upstream read directly (no proxy: the floor for latency);
- bare: a pass-through aiohttp proxy of about 40 lines (``--bare-proxy``, in this file): the
  floor for a Python proxy on this machine;
- ours: ``python server.py`` with ``OPENAI_BASE_URL`` at the upstream (store on: every event
  in DuckDB);
- with both loops (unless ``--one-loop``): ``bare-uvloop``, the same bare proxy on uvloop
  (the floor for a Python proxy that picks the faster loop, as ours does by default), and
  ``ours-asyncio``, ours with ``EVENT_LOOP=asyncio``: what uvloop is worth on each side;
- litellm: LiteLLM's proxy (1 worker), installed by this bench into a throw-away venv
  (``--litellm-venv``, default under /tmp); skipped with the reason when it cannot be
  installed or started. It is never a dependency of the project.

Figures (medians over ``--reps`` interleaved repetitions; no figure is asserted anywhere):

- server CPU per token and per request: for each N in ``--tokens`` (default 20,100,200), a
  batch of ``--batch`` concurrent requests of N tokens; the server's CPU (utime + stime from
  /proc) per request is fitted against N: the slope is the CPU per token, the intercept the
  CPU per request; the same fit of the main thread alone (the event loop) splits them, the
  rest being other threads' (ours: the store's writer, whose flush every
  ``FLUSH_INTERVAL_MS`` costs the same whatever the row count: a cost per second of
  streaming, which a longer batch charges to its tokens);
- time to first token (TTFT) over ``--ttft-requests`` (30) sequential requests, and what each
  proxy adds to the direct median;
- fan-out: ``--fanout`` (400) concurrent streams of 100 tokens; p99 of the extra inter-token
  gap (the gap minus the token delay), streams refused at the door (a 503 or 429, e.g.
  ``MAX_LIVE_TURNS``), streams admitted but unfinished, and the median and p99 time to
  first token under that burst of starts (which the gaps between tokens do not show);
- a per-stage breakdown of our hot path in this process (µs per event): parse (one SDK chunk),
  pipeline (the Rx chain), store (building the Arrow row), frame (SSE framing), so the next
  regression names its stage.

Run: ``python bench/proxy_bench.py [--reps 3] [--tokens 20,100,200] [--batch 20]
[--fanout 400] [--no-litellm]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
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
CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("direct", "bare", "bare-uvloop", "ours", "ours-asyncio", "litellm")


# -- the bare pass-through proxy -------------------------------------------------------------
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def bare_proxy(request: web.Request) -> web.StreamResponse:
    """Forward the body upstream and stream the answer back, byte for byte."""
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM] + request.path, data=body,
                            headers={"Content-Type": "application/json",
                                     "Authorization": "Bearer offline"}) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": upstream.headers.get("Content-Type", "application/json")})
        await response.prepare(request)
        async for piece in upstream.content.iter_any():
            await response.write(piece)
        await response.write_eof()
        return response


def run_bare(port: int, upstream: str, *, uvloop_: bool) -> None:
    factory = None
    if uvloop_:
        import uvloop

        factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run_bare_proxy(port, upstream))


async def run_bare_proxy(port: int, upstream: str) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", bare_proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# -- processes -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_cpu_s(stat: Path) -> float:
    """utime + stime of a /proc ``stat`` file, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process and its threads, in seconds."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def loop_cpu_s(pid: int) -> float:
    """utime + stime of a process's main thread alone (its event loop), in seconds: the
    rest of :func:`proc_cpu_s` is its other threads' (ours: the store's writer)."""
    return _stat_cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    base: str  # e.g. http://127.0.0.1:P/v1
    log: Path
    key: str = "offline"  # the Bearer key its clients send


def start(name: str, argv: list[str], env: dict[str, str], port: int, tmp: Path,
          *, v1: bool = True, key: str = "offline") -> Proc:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, proc, f"http://127.0.0.1:{port}" + ("/v1" if v1 else ""), log, key)


async def wait_ready(session: aiohttp.ClientSession, proc: Proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"model": "offline", "messages": [{"role": "user", "content": "warm"}],
            "max_tokens": 2, "stream": True}
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.post(proc.base + "/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {proc.key}"}) as r:
                if r.status == 200:
                    await r.read()
                    return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{proc.name} not ready after {timeout_s}s: {proc.log.read_text()[-2000:]}")


def stop(proc: Proc) -> None:
    if proc.proc.poll() is None:
        proc.proc.terminate()
        try:
            proc.proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait()


def install_litellm(venv: Path) -> tuple[Path | None, str]:
    """LiteLLM's proxy in its own venv; (its ``litellm`` command or None, why not)."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
                       check=True, capture_output=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"install failed: {exc} {detail.decode(errors='replace')[-300:]}"
    return (exe, "") if exe.exists() else (None, "no litellm command after install")


# -- clients ---------------------------------------------------------------------------------
@dataclass
class Stream:
    started: float = 0.0
    first: float | None = None
    arrivals: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None


async def stream_once(session: aiohttp.ClientSession, proc: Proc, tokens: int, out: Stream,
                      *, content: str = "Tell me a story") -> None:
    body = {"model": "offline", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": content}]}
    out.started = time.perf_counter()
    try:
        async with session.post(proc.base + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {proc.key}"}) as r:
            if r.status != 200:
                out.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    out.done = True
                    return
                now = time.perf_counter()
                chunk = json.loads(payload)
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    if out.first is None:
                        out.first = now
                    out.arrivals.append(now)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        out.error = repr(exc)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (x, y): (slope, intercept)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return slope, my - slope * mx


# -- the measurements ------------------------------------------------------------------------
async def cpu_batch(session: aiohttp.ClientSession, proc: Proc, pid: int, tokens: int,
                    batch: int) -> tuple[float, float, int]:
    """CPU seconds per request of ``pid`` over one batch, in all and of its event-loop
    thread alone; and how many requests failed."""
    streams = [Stream() for _ in range(batch)]
    before, loop_before = proc_cpu_s(pid), loop_cpu_s(pid)
    await asyncio.gather(*(stream_once(session, proc, tokens, s) for s in streams))
    await asyncio.sleep(0.3)  # the store's flush of this batch counts too
    spent, loop_spent = proc_cpu_s(pid) - before, loop_cpu_s(pid) - loop_before
    return spent / batch, loop_spent / batch, sum(1 for s in streams if not s.done)


async def ttft(session: aiohttp.ClientSession, proc: Proc, n: int) -> list[float]:
    times = []
    for i in range(n):
        s = Stream()
        await stream_once(session, proc, 3, s, content=f"first token please {i}")
        if s.first is not None:
            times.append((s.first - s.started) * 1000)
    return times


async def ttft_conversation(session: aiohttp.ClientSession, proc: Proc, n: int, *,
                            native: bool) -> list[float]:
    """TTFT over ``n`` sequential turns of one conversation (memory on: each turn loads the
    ones before): ``/v1/chat/completions`` with ``conversation_id``, or ``/v1/orchestrate``
    (native SSE, trace on, heartbeats on)."""
    times: list[float] = []
    conversation: str | None = None
    root = proc.base.removesuffix("/v1")
    for i in range(n):
        messages = [{"role": "user", "content": f"and then? {i}"}]
        body: dict[str, Any]
        if native:
            url, body = root + "/v1/orchestrate", {"messages": messages, "max_tokens": 3,
                                                   "trace": True}
        else:
            url, body = proc.base + "/chat/completions", {
                "model": "offline", "stream": True, "max_tokens": 3, "messages": messages}
        if conversation:
            body["conversation_id"] = conversation
        started = time.perf_counter()
        first: float | None = None
        async with session.post(url, json=body,
                                headers={"Authorization": f"Bearer {proc.key}"}) as r:
            if r.status != 200:
                raise RuntimeError(f"{proc.name}: HTTP {r.status}: {(await r.text())[:200]}")
            conversation = conversation or r.headers.get("X-Conversation-Id")
            kind = b""
            async for line in r.content:
                if first is not None:
                    continue  # read to the end: the next turn starts after this one
                if line.startswith(b"event: "):
                    kind = line[7:].strip()
                elif line.startswith(b"data: ") and (kind == b"text" if native else
                                                     b'"content":"' in line):
                    first = time.perf_counter()
        if first is not None and i:  # the first turn has no history yet
            times.append((first - started) * 1000)
    return times


async def fanout(session: aiohttp.ClientSession, proc: Proc, n: int, tokens: int,
                 delay_ms: float) -> tuple[float, int, float, int, float, float]:
    """(p99 extra gap ms, unfinished streams, tokens/s delivered, refused streams, median and
    p99 time to first token ms) for n concurrent streams; a refused stream (503/429) is not
    counted as unfinished. The gaps are between tokens only: what the burst of starts costs
    shows in the time to first token."""
    streams = [Stream() for _ in range(n)]

    async def one(i: int, s: Stream) -> None:
        await asyncio.sleep(i / n)  # ramp over one second
        await stream_once(session, proc, tokens, s, content=f"fan out {i}")

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in enumerate(streams))),
                           timeout=tokens * delay_ms / 1000 * 6 + 60)
    wall = time.perf_counter() - started
    gaps = [(b - a) * 1000 - delay_ms for s in streams
            for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    delivered = sum(len(s.arrivals) for s in streams)
    refused = sum(1 for s in streams if s.error and s.error.startswith(("HTTP 503", "HTTP 429")))
    unfinished = sum(1 for s in streams if not s.done) - refused
    firsts = [(s.first - s.started) * 1000 for s in streams if s.first is not None]
    return (percentile(gaps, 0.99), unfinished, delivered / wall, refused,
            percentile(firsts, 0.5), percentile(firsts, 0.99))


def stage_breakdown(n: int = 20_000) -> dict[str, float]:
    """µs per event of each stage of our hot path, measured in this process."""
    from core.events import Text
    from pipeline.providers import ChunkReader
    from sinks.sse import event_frame
    from sinks.store import _EventRow, _events_table

    chunk = json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                        "model": "offline", "choices": [{"index": 0, "delta": {"content": "tok "},
                                                          "finish_reason": None}]})
    out: dict[str, float] = {}
    frame = f"data: {chunk}\n\n".encode()
    reader = ChunkReader(model="offline")
    t = time.perf_counter()
    for _ in range(n):
        for _piece in reader.feed(frame):
            pass
    out["parse (one SSE chunk → a Delta, ChunkReader)"] = (time.perf_counter() - t) / n * 1e6

    import reactivex
    from reactivex import operators as ops

    from operators import number_events, visible
    events = [Text(stream_id=1, delta="tok ") for _ in range(n)]
    sink: list[Any] = []
    t = time.perf_counter()
    reactivex.from_iterable(events).pipe(number_events("req_x"), visible(trace=False),
                                         ops.filter(lambda e: True)).subscribe(sink.append)
    out["pipeline (number, visible: Rx)"] = (time.perf_counter() - t) / n * 1e6

    rows = [_EventRow(e, "assistant", 0) for e in sink]
    _events_table(rows[:10])  # pyarrow's one-time setup of its first table is not per event
    t = time.perf_counter()
    _events_table(rows)
    out["store (Arrow row build, writer thread)"] = (time.perf_counter() - t) / n * 1e6

    t = time.perf_counter()
    for e in sink:
        event_frame(e)
    out["frame (native SSE frame, JSON)"] = (time.perf_counter() - t) / n * 1e6
    return out


# -- driver ----------------------------------------------------------------------------------
async def drive(args: argparse.Namespace, procs: dict[str, Proc], pids: dict[str, int]
                ) -> dict[str, dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    results: dict[str, dict[str, Any]] = {
        name: {"cpu": [], "cpu_loop": [], "ttft": [], "fanout": []} for name in procs}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for proc in procs.values():
            await wait_ready(session, proc)
            for _ in range(3):  # warm-up
                await stream_once(session, proc, 5, Stream())
        for rep in range(args.reps):
            for name, proc in procs.items():  # interleaved: one rep of every variant in turn
                points, loop_points = [], []
                for tokens in args.tokens:
                    per_request, in_loop, failed = await cpu_batch(
                        session, proc, pids[name], tokens, args.batch)
                    points.append((tokens, per_request))
                    loop_points.append((tokens, in_loop))
                    if failed:
                        print(f"  {name}: {failed} of {args.batch} failed at N={tokens}",
                              file=sys.stderr)
                results[name]["cpu"].append(fit(points))
                results[name]["cpu_loop"].append(fit(loop_points))
                results[name]["ttft"].append(statistics.median(
                    await ttft(session, proc, args.ttft_requests) or [float("nan")]))
                if name == "ours":  # memory and the native wire: ours only
                    for key, native in (("ttft_chat_history", False),
                                        ("ttft_native_history", True)):
                        results[name].setdefault(key, []).append(statistics.median(
                            await ttft_conversation(session, proc, args.ttft_requests,
                                                    native=native) or [float("nan")]))
                if args.fanout:
                    results[name]["fanout"].append(
                        await fanout(session, proc, args.fanout, 100, args.token_delay_ms))
                print(f"  rep {rep + 1} {name} done", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, skipped: str) -> None:
    med = statistics.median
    rows: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        slopes = [s for s, _ in r["cpu"]]
        intercepts = [i for _, i in r["cpu"]]

        def fan(i: int, runs: list[tuple[Any, ...]] = r["fanout"]) -> float:
            """The median over the reps of the fan-out's ``i``-th figure."""
            return med([f[i] for f in runs]) if runs else float("nan")

        rows[name] = {
            "cpu_token_us": med(slopes) * 1e6, "cpu_request_ms": med(intercepts) * 1e3,
            "loop_token_us": med([s for s, _ in r["cpu_loop"]]) * 1e6,
            "loop_request_ms": med([i for _, i in r["cpu_loop"]]) * 1e3,
            "ttft_ms": med(r["ttft"]),
            "p99_gap_ms": fan(0),
            "unfinished": max([f[1] for f in r["fanout"]], default=0),
            "refused": max([f[3] for f in r["fanout"]], default=0),
            "tokens_s": fan(2),
            "fan_ttft_ms": fan(4),
            "fan_ttft_p99_ms": fan(5),
            "ttft_chat_history": med(r.get("ttft_chat_history") or [float("nan")]),
            "ttft_native_history": med(r.get("ttft_native_history") or [float("nan")]),
        }
    direct_ttft = rows.get("direct", {}).get("ttft_ms", float("nan"))
    names = [n for n in VARIANTS if n in rows and n != "direct"]
    print(f"\nproxy_bench: token delay {args.token_delay_ms:g} ms, CPU batches of {args.batch} "
          f"at N={args.tokens}, {args.reps} interleaved reps (medians), fan-out {args.fanout}")
    print(f"{'figure':<42}" + "".join(f"{n:>14}" for n in names))
    lines = [
        ("server CPU per token (slope), µs", "cpu_token_us", ".0f"),
        ("  … of it the event loop's thread, µs", "loop_token_us", ".0f"),
        ("server CPU per request (intercept), ms", "cpu_request_ms", ".1f"),
        ("  … of it the event loop's thread, ms", "loop_request_ms", ".1f"),
        ("TTFT added vs direct (median), ms", None, ".1f"),
        ("  … chat, a conversation with history", "ttft_chat_history", ".1f"),
        ("  … /v1/orchestrate, history, trace on", "ttft_native_history", ".1f"),
        (f"p99 extra inter-token gap at N={args.fanout}, ms", "p99_gap_ms", ".0f"),
        (f"streams refused (503/429) at N={args.fanout}", "refused", ".0f"),
        (f"streams admitted, unfinished at N={args.fanout}", "unfinished", ".0f"),
        (f"tokens/s delivered at N={args.fanout}", "tokens_s", ",.0f"),
        (f"time to first token at N={args.fanout}, median, ms", "fan_ttft_ms", ",.0f"),
        (f"time to first token at N={args.fanout}, p99, ms", "fan_ttft_p99_ms", ",.0f"),
    ]
    for label, key, spec in lines:
        cells = []
        for n in names:
            if key is None:
                value = rows[n]["ttft_ms"] - direct_ttft
            elif key.startswith("ttft_"):
                value = rows[n][key] - direct_ttft  # nan for the other variants
            else:
                value = rows[n][key]
            cells.append(f"{value:>14{spec}}")
        print(f"{label:<42}" + "".join(cells))
    if "bare" in rows and "ours" in rows:
        b, o = rows["bare"], rows["ours"]
        def ratio(key: str) -> str:
            return f"{o[key] / b[key]:.2f}x" if b[key] > 0 else "n/a (bare <= 0)"

        print(f"ratios ours/bare: CPU per token {ratio('cpu_token_us')}, "
              f"per request {ratio('cpu_request_ms')}")
        if "bare-uvloop" in rows and rows["bare-uvloop"]["cpu_token_us"] > 0:
            print("ratio ours/bare-uvloop (both on uvloop): CPU per token "
                  f"{o['cpu_token_us'] / rows['bare-uvloop']['cpu_token_us']:.2f}x")
    print(f"direct TTFT median {direct_ttft:.1f} ms")
    if skipped:
        print(f"litellm skipped: {skipped}")
    print("\nour hot path per stage, µs per event (this process):")
    for stage, us in stage_breakdown().items():
        print(f"  {stage:<44}{us:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", default="20,100,200")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--ttft-requests", type=int, default=30)
    parser.add_argument("--fanout", type=int, default=400, help="0 skips the fan-out phase")
    parser.add_argument("--token-delay-ms", type=float, default=50.0)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--one-loop", action="store_true",
                        help="skip the bare-uvloop and ours-asyncio variants")
    parser.add_argument("--litellm-venv", default=str(Path(tempfile.gettempdir()) /
                                                      "agentflow-bench-litellm"))
    parser.add_argument("--bare-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uvloop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_proxy:
        run_bare(args.port, args.upstream, uvloop_=args.uvloop)
        return
    args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="proxy_bench_"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DB_PATH"))}
    env["PYTHONUNBUFFERED"] = "1"
    procs: dict[str, Proc] = {}
    skipped = ""
    try:
        port = free_port()
        procs["direct"] = start("direct", [sys.executable, "-m", "pipeline.offline_model",
                                           "--port", str(port), "--token-delay-ms",
                                           f"{args.token_delay_ms:g}"], env, port, tmp)
        upstream = procs["direct"].base
        port = free_port()
        procs["bare"] = start("bare", [sys.executable, str(Path(__file__).resolve()),
                                       "--bare-proxy", "--upstream",
                                       upstream.removesuffix("/v1"), "--port", str(port)],
                              env, port, tmp)
        if not args.one_loop:
            port = free_port()
            procs["bare-uvloop"] = start("bare-uvloop", [
                sys.executable, str(Path(__file__).resolve()), "--bare-proxy", "--uvloop",
                "--upstream", upstream.removesuffix("/v1"), "--port", str(port)], env, port, tmp)
        port = free_port()
        # The door's admission limits (MAX_LIVE_TURNS, 200 by default) would refuse part of
        # the fan-out: raised here, so the fan-out measures the hot path, not the shedding.
        limit = str(max(200, 2 * args.fanout))
        ours_env = {**env, "OPENAI_BASE_URL": upstream, "OPENAI_API_KEY": "offline",
                    "MODELS": '["offline"]', "MAX_LIVE_TURNS": limit,
                    "MAX_OPEN_STREAMS": str(max(1024, 2 * args.fanout))}
        procs["ours"] = start("ours", [sys.executable, "server.py", "--port", str(port),
                                       "--db", str(tmp / "events.duckdb")], ours_env, port, tmp)
        if not args.one_loop:
            port = free_port()
            procs["ours-asyncio"] = start("ours-asyncio", [
                sys.executable, "server.py", "--port", str(port), "--db",
                str(tmp / "events-asyncio.duckdb")], {**ours_env, "EVENT_LOOP": "asyncio"},
                port, tmp)
        if args.no_litellm:
            skipped = "--no-litellm"
        else:
            exe, skipped = install_litellm(Path(args.litellm_venv))
            if exe is not None:
                port = free_port()
                key = "sk-" + os.urandom(24).hex()  # LiteLLM refuses to start without one
                procs["litellm"] = start("litellm", [
                    str(exe), "--model", "openai/offline", "--api_base", upstream,
                    "--port", str(port), "--num_workers", "1", "--host", "127.0.0.1"],
                    {**env, "OPENAI_API_KEY": "offline", "LITELLM_MASTER_KEY": key},
                    port, tmp, key=key)
        pids = {name: p.proc.pid for name, p in procs.items()}
        try:
            results = asyncio.run(drive(args, procs, pids))
        except RuntimeError as exc:
            if "litellm" in str(exc) and "litellm" in procs:
                skipped = f"did not start: {str(exc)[:300]}"
                stop(procs.pop("litellm"))
                pids.pop("litellm")
                results = asyncio.run(drive(args, procs, pids))
            else:
                raise
    finally:
        for proc in procs.values():
            stop(proc)
    report(results, args, skipped)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
