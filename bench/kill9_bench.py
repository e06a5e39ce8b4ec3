"""What a ``kill -9`` loses: events a client saw that the store does not hold after a restart.

Against real ``python server.py`` processes (offline model, one token every
``--token-ms``), ``--runs`` times:

- **mid-turn**: a client follows a turn; after ``--after`` text events the server is killed
  (SIGKILL) and restarted on the same file; *lost* = the client's last seq minus the
  request's highest stored seq below recovery's closing events, in events and in ms of
  stream (events × token delay). The bound is ``FLUSH_INTERVAL_MS``: the writer writes what
  waits at least that often.
- **after done**: the server is killed the moment the client has read ``done ok: true``;
  *lost* = events before ``done`` that the store does not hold (the done barrier makes
  this 0; ``done`` itself may be lost, and recovery closes the turn as ``interrupted``).

Run: ``python bench/kill9_bench.py [--runs N] [--flush-ms MS] [--token-ms MS] [--after K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
SEQ_GAP = 10_000_000  # sinks.recovery.SEQ_GAP: recovery's closing events come after it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(db: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    variables = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port), "--db", str(db)],
        cwd=ROOT, env=variables, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def start(db: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn(db, env, port)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            try:
                async with session.get(f"{base}/healthz") as resp:
                    if resp.status == 200:
                        return proc, base
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


async def follow(base: str, *, stop: Any) -> list[dict[str, Any]]:
    """Events of one turn until ``stop(events)`` says so."""
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.post(
            f"{base}/v1/orchestrate", json={"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 2000}) as resp:
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if stop(events):
                    return events
    return events


async def stored_max_seq(base: str, request_id: str) -> tuple[int, list[str]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{base}/v1/requests/{request_id}/events", params={"trace": "true"}) as resp:
        seqs: list[int] = []
        kinds: list[str] = []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seqs.append(event["seq"])
                kinds.append(f"{event['type']} {event.get('reason', '')}".strip())
    return max([s for s in seqs if s < SEQ_GAP] or [0]), kinds


async def one(folder: Path, env: dict[str, str], *, after: int, mode: str) -> dict[str, Any]:
    db = folder / f"{mode}-{time.monotonic_ns()}.duckdb"
    proc, base = await start(db, env)
    if mode == "mid-turn":
        def stop(events: list[dict[str, Any]]) -> bool:
            return sum(e["type"] == "text" for e in events) >= after
    else:
        def stop(events: list[dict[str, Any]]) -> bool:
            return events[-1]["type"] == "done"
    try:
        seen = await follow(base, stop=stop)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    request_id, last_seen = seen[0]["request_id"], seen[-1]["seq"]
    proc, base = await start(db, env)
    try:
        stored, kinds = await stored_max_seq(base, request_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    before_done = last_seen - 1 if mode == "after-done" else last_seen
    return {"lost": max(0, before_done - stored), "done_ok": seen[-1].get("ok"),
            "closed_as": kinds[-1] if kinds else None}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flush-ms", type=float, default=250)
    parser.add_argument("--token-ms", type=float, default=2)
    parser.add_argument("--after", type=int, default=300)
    args = parser.parse_args()
    env = {"FLUSH_INTERVAL_MS": str(args.flush_ms), "OFFLINE_TOKEN_DELAY_MS": str(args.token_ms)}
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        os.environ.pop(name, None)
    results: dict[str, list[dict[str, Any]]] = {"mid-turn": [], "after-done": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for mode in results:
                print(f"run {run + 1}: {mode}", file=sys.stderr)
                results[mode].append(await one(Path(tmp), env, after=args.after, mode=mode))
    print(f"FLUSH_INTERVAL_MS={args.flush_ms:g}, a token every {args.token_ms:g} ms, "
          f"{args.runs} runs\n")
    print("| kill -9 | events lost (each run) | most lost | as stream time |")
    print("| --- | --- | ---: | ---: |")
    for mode, runs in results.items():
        lost = [r["lost"] for r in runs]
        print(f"| {mode} | {', '.join(map(str, lost))} | {max(lost)} "
              f"| {max(lost) * args.token_ms:.0f} ms |")
    print("\nafter-done: the client saw done ok =", {r["done_ok"] for r in results["after-done"]},
          "; the store's last event after the restart:",
          sorted({r["closed_as"] for r in results["after-done"]}))


if __name__ == "__main__":
    asyncio.run(main())
