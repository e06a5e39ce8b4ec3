"""The supervisor's plan of children (the recorder and the workers) and its refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import server
from api.supervisor import children
from core.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_is_one_recorder_owning_the_file_and_workers_pointing_at_it() -> None:
    settings = Settings(workers=2, event_log="redis://127.0.0.1:6379/12",
                        db_path=Path("/data/events.duckdb"))
    plan = children(settings, server="server.py", port=8123, recorder_port=9100)
    recorder, *workers = plan
    assert recorder.role == "recorder" and recorder.name == "recorder"
    assert recorder.argv[1:] == ["server.py", "--role", "recorder", "--recorder-port", "9100"]
    assert recorder.env["DB_PATH"] == "/data/events.duckdb"
    assert "REUSE_PORT" not in recorder.env
    assert [w.name for w in workers] == ["worker-1", "worker-2"]
    for worker in workers:
        assert worker.argv[1:] == ["server.py", "--role", "worker", "--recorder-url",
                                   "http://127.0.0.1:9100"]
        assert worker.env.get("DB_PATH") == os.environ.get("DB_PATH")  # the plan sets none
        assert worker.env["PORT"] == "8123" and worker.env["REUSE_PORT"] == "true"
        assert worker.env["WORKERS"] == "1"  # a child never supervises
        assert worker.env["EVENT_LOG"] == "redis://127.0.0.1:6379/12"
        assert worker.env["EXPORT_DIR"] == "/data/lake"  # the recorder's: GET /v1/export



def test_the_plan_gives_its_children_one_recorder_key_made_per_start_unless_set() -> None:
    redis = "redis://127.0.0.1:6379/12"
    first = children(Settings(workers=2, event_log=redis), server="server.py", port=8123,
                     recorder_port=9100)
    keys = {child.env["RECORDER_TOKEN"] for child in first}
    assert len(keys) == 1 and len(next(iter(keys))) >= 32  # the recorder's and its workers'
    again = children(Settings(workers=2, event_log=redis), server="server.py", port=8123,
                     recorder_port=9100)
    assert again[0].env["RECORDER_TOKEN"] not in keys  # a new one each start
    given = "an-operators-own-recorder-key"
    chosen = children(Settings(workers=2, event_log=redis, recorder_token=given),
                      server="server.py", port=8123, recorder_port=9100)
    assert {child.env["RECORDER_TOKEN"] for child in chosen} == {given}


def test_who_supervises() -> None:
    redis = "redis://127.0.0.1:6379/12"
    assert not server.supervised(Settings())  # make run: one process
    assert not server.supervised(Settings(event_log=redis))  # one process on Redis
    assert server.supervised(Settings(event_log=redis, workers=1))  # asked for: 1 + recorder
    assert server.supervised(Settings(event_log=redis, workers=3))
    assert not server.supervised(Settings(event_log=redis, workers=1, role="worker"))  # a child


def test_a_port_held_by_another_program_is_refused_with_one_line_and_exit_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with socket.socket() as holder:  # no SO_REUSEPORT: nobody may join it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "server.py", "--workers", "2", "--event-log",
             "redis://127.0.0.1:6379/12", "--port", str(port), "--db",
             str(tmp_path / "e.duckdb")], cwd=ROOT, env=env, capture_output=True, timeout=60)
    lines = (done.stdout + done.stderr).decode().strip().splitlines()
    assert done.returncode == 1, lines
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
