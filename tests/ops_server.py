"""A real ``python server.py`` process configured by environment only (no flags), for the
operations tests: logs, metrics, traces, startup failures, the Makefile's run line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from core.config import Settings
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def clean_env(**settings: str) -> dict[str, str]:
    """The environment without any setting of ours (nor OPENAI_*), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


@dataclasses.dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    db: Path  # its DuckDB file (DB_PATH)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (to this process only), then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop:\n{self.output()[-3000:]}") from None


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def launch(folder: Path, *, argv: list[str] | None = None, port: int | None = None,
           **settings: str) -> Proc:
    """Start the server with ``PORT``, ``DB_PATH`` (in ``folder``) and ``settings`` from the
    environment; do not wait."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    env = clean_env(**{"PORT": str(port), "DB_PATH": str(folder / "events.duckdb"),
                       "OFFLINE_TOKEN_DELAY_MS": "1", **settings})
    log = folder / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv or [sys.executable, "server.py"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return Proc(proc=proc, base=f"http://127.0.0.1:{port}", log=log, db=folder / "events.duckdb")


def wait_healthy(running: Proc) -> Proc:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if running.proc.poll() is not None:
            raise AssertionError(f"server exited with {running.proc.returncode}:\n{running.output()}")
        try:
            if get_json(f"{running.base}/healthz", timeout=1)["status"] == "ok":
                return running
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            running.proc.kill()
            running.proc.wait()
            raise AssertionError(f"server not healthy in {START_TIMEOUT_S}s:\n{running.output()}")
        time.sleep(0.05)


def start(folder: Path, **settings: str) -> Proc:
    return wait_healthy(launch(folder, **settings))
