"""``python -m pipeline sql``: the SQL prompt for those without a DuckDB CLI, driven through
stdin as a real process (``--db``, read-only); ``--server`` is in ``tests/test_api_e2e.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from core.events import Done, RequestReceived
from pipeline.cli import split_statements
from sinks.store import EventStore, RequestRow

ROOT = Path(__file__).resolve().parents[1]


def sql_prompt(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "sql", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.duckdb"
    with EventStore(path) as store:
        for seq, event in enumerate((RequestReceived(agent="assistant", conversation_id="c1"),
                                     Done(ok=True, duration_ms=42, reason="completed")), start=1):
            event.request_id, event.seq = "r1", seq
            store.append_event(event, agent=None, depth=None)
        store.put_request(RequestRow(request_id="r1", conversation_id="c1", kind="orchestrate",
                                     status="completed", started_at=1_790_000_000.0,
                                     duration_ms=42))
    return path


def test_split_statements_respects_quotes_and_comments() -> None:
    assert split_statements("SELECT 1; SELECT 'a;b', \"c;d\" -- e;f\n; SELECT") == (
        ["SELECT 1", "SELECT 'a;b', \"c;d\" -- e;f"], " SELECT")
    assert split_statements("SELECT 'it''s;'; ;") == (["SELECT 'it''s;'"], "")
    assert split_statements("SELECT 2") == ([], "SELECT 2")


def test_statements_and_commands_from_stdin(store_file: Path) -> None:
    run = sql_prompt("--db", str(store_file), stdin=(
        "SELECT request_id, status,\n"
        "       duration_ms FROM requests;\n"
        "SELECT no_such_column FROM events;\n"
        ".schema request_latency\n"
        ".format json\n"
        "SELECT type, seq FROM events ORDER BY seq;\n"
        ".format csv\n"
        "SELECT request_id, errors, duration_ms FROM request_latency\n"  # the last needs no ';'
    ))
    assert run.returncode == 1, run  # one statement failed: a script's caller must know
    out = run.stdout
    assert out.startswith(
        "request_id │ status    │ duration_ms\n"
        "───────────┼───────────┼────────────\n"
        "r1         │ completed │          42\n"
        "(1 row)\n"), out
    assert "first_token_ms" in out and "BIGINT" in out  # .schema request_latency
    assert '{"type": "request_received", "seq": 1}\n{"type": "done", "seq": 2}\n' in out
    assert out.endswith("request_id,errors,duration_ms\nr1,0,42\n"), out
    assert run.stderr.count("error: ") == 1 and "no_such_column" in run.stderr, run.stderr


def test_the_prompt_is_read_only_and_says_so(store_file: Path) -> None:
    run = sql_prompt("--db", str(store_file), stdin="DELETE FROM events;\n.bogus\n.quit\nSELECT 1;\n")
    assert run.returncode == 1
    assert run.stdout == ""  # .quit stopped before SELECT 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and "DELETE" in lines[0] and "unknown command '.bogus'" in lines[1], lines
    con = duckdb.connect(str(store_file), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(2,)]
    con.close()


def test_a_file_held_by_a_server_points_to_server(store_file: Path) -> None:
    holder = duckdb.connect(str(store_file))  # as a running server holds it
    try:
        run = sql_prompt("--db", str(store_file), stdin="SELECT 1;\n")
    finally:
        holder.close()
    assert run.returncode == 2 and run.stdout == ""
    assert "--server" in run.stderr and "holds it" in run.stderr, run.stderr


def test_on_a_terminal_it_prompts(store_file: Path) -> None:
    """Interactive use: a banner, ``sql> `` and ``   -> `` prompts, results, ``.quit``."""
    import os
    import pty
    import select

    main_fd, tty_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sql", "--db", str(store_file)],
                            stdin=tty_fd, stdout=tty_fd, stderr=tty_fd, cwd=ROOT,
                            env={**os.environ, "TERM": "dumb"})
    os.close(tty_fd)
    screen = b""

    def read_until(marker: bytes) -> None:
        nonlocal screen
        while marker not in screen:
            ready, _, _ = select.select([main_fd], [], [], 30)
            assert ready, f"no {marker!r} within 30 s: {screen!r}"
            screen += os.read(main_fd, 4096)

    try:
        read_until(b"sql> ")
        os.write(main_fd, b"SELECT 40 + 2\n")
        read_until(b"   -> ")
        os.write(main_fd, b"  AS answer;\n")
        read_until(b"(1 row)")
        os.write(main_fd, b".quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
    text = screen.decode(errors="replace").replace("\r\n", "\n")
    assert f"{store_file} (read-only)" in text, text
    assert "answer\n──────\n    42\n(1 row)" in text, text
