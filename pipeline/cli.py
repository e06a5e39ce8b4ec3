"""``python -m pipeline``: analysts' command line — query, export, report, sql.

Each command reads either through a running server (``--server URL``: ``/v1/query`` and
``/v1/export``) or straight from the DuckDB file (``--db PATH``, opened read-only, which
works only while no server holds it). Without either, it uses ``--db`` with ``DB_PATH``.

::

    python -m pipeline query "SELECT * FROM request_latency LIMIT 5" --server http://127.0.0.1:8080
    python -m pipeline query "SELECT * FROM tool_stats" --db data/events.duckdb --format csv
    python -m pipeline export --server http://127.0.0.1:8080 --out ./lake
    python -m pipeline report --out report.html --db data/events.duckdb
    python -m pipeline sql --server http://127.0.0.1:8080       # an interactive SQL prompt
    echo "SELECT count(*) FROM events;" | python -m pipeline sql --db data/events.duckdb

Exit codes: 0 done, 1 the query or export failed (refused, timed out, bad SQL), 2 the
source could not be reached or opened, or the arguments were wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import duckdb

from core.config import Settings
from core.errors import PipelineError
from sinks.lake import export_lake
from sinks.query import QueryError, QueryResult, json_safe, run_query
from sinks.views import create_views


class CliError(PipelineError):
    """A failure the command line reports in one line, with its exit code."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Source(Protocol):
    """Where analysts' reads go: the file, or a running server."""

    def query(self, sql: str, *, max_rows: int | None = None) -> QueryResult: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class DbSource:
    """The store's file, opened read-only (fails clearly while a server holds it)."""

    def __init__(self, path: Path | str, *, settings: Settings) -> None:
        self.path = Path(path)
        self.settings = settings
        if not self.path.exists():
            raise CliError(f"no event store at {self.path} (DB_PATH or --db)", exit_code=2)
        try:
            self.con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as exc:
            raise CliError(_open_failure(self.path, exc), exit_code=2) from exc
        # The views as this code defines them, whether or not the file has them yet.
        create_views(self.con, temp=True)

    def query(self, sql: str, *, max_rows: int | None = None) -> QueryResult:
        try:
            return run_query(self.con, sql, max_rows=max_rows or self.settings.query_max_rows,
                             timeout_s=self.settings.query_timeout_s, fresh_cursor=False)
        except QueryError as exc:
            raise CliError(str(exc)) from exc

    def export(self, out: Path) -> dict[str, Any]:
        return export_lake(self.con, out, settle_s=0).to_json()

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self.con.close()


def _open_failure(path: Path, exc: duckdb.Error) -> str:
    message = str(exc)
    if "lock" in message.lower():
        pid = re.search(r"PID (\d+)", message)
        holder = f"process {pid.group(1)}" if pid else "another process"
        return (f"cannot open {path}: {holder} holds it (a running server?). DuckDB lets no other "
                "process open the file then, read-only included. Use --server http://HOST:PORT "
                "to go through the server, read the Parquet export, or stop the server.")
    return f"cannot open {path}: {message}"


class ServerSource:
    """A running server, through ``/v1/query`` and ``/v1/export``."""

    def __init__(self, url: str, *, key: str | None, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload: bytes = response.read()
                return payload
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise CliError(f"{method} {path}: HTTP {exc.code}: {detail}",
                           exit_code=2 if exc.code in (401, 404) else 1) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise CliError(f"cannot reach the server at {self.url}: {exc}", exit_code=2) from exc

    def query(self, sql: str, *, max_rows: int | None = None) -> QueryResult:
        body: dict[str, Any] = {"sql": sql, "format": "json"}
        if max_rows:
            body["max_rows"] = max_rows
        data = json.loads(self._request("POST", "/v1/query", body))
        return QueryResult(columns=data["columns"], types=data.get("types", []),
                           rows=[tuple(row) for row in data["rows"]], truncated=data["truncated"],
                           elapsed_ms=data.get("elapsed_ms", 0.0))

    def export(self, out: Path | None) -> dict[str, Any]:
        """Ask the server to export now; with ``out``, mirror its lake's new files there."""
        report: dict[str, Any] = json.loads(self._request("POST", "/v1/export", {}))
        if out is None:
            return report
        manifest = json.loads(self._request("GET", "/v1/export"))
        copied = present = 0
        for entry in manifest["files"]:
            target = out / entry["path"]
            if target.exists() and target.stat().st_size == entry["bytes"]:
                present += 1  # lake files never change once written
                continue
            payload = self._request("GET", "/v1/export/files/" + urllib.parse.quote(entry["path"]))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, target)
            copied += 1
        report["copied"] = {"to": str(out.resolve()), "files": copied, "already_there": present}
        return report

    def describe(self) -> str:
        return self.url

    def close(self) -> None:
        pass


def open_source(args: argparse.Namespace, settings: Settings) -> Source:
    if args.server:
        return ServerSource(args.server, key=args.key or settings.admin_key)
    return DbSource(args.db or settings.db_path, settings=settings)


# -- output -------------------------------------------------------------------------------


def format_table(result: QueryResult, *, max_width: int = 60) -> str:
    """An aligned text table, with the row count (and whether it was cut off) below."""

    def cell(value: Any) -> str:
        safe = json_safe(value)
        text = "NULL" if safe is None else (
            json.dumps(safe, separators=(",", ":")) if isinstance(safe, dict | list) else str(safe))
        text = text.replace("\n", "⏎")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [" │ ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)).rstrip(),
             "─┼─".join("─" * w for w in widths)]
    for row, original in zip(cells, result.rows, strict=True):
        lines.append(" │ ".join(
            c.rjust(w) if isinstance(v, int | float) and not isinstance(v, bool) else c.ljust(w)
            for c, w, v in zip(row, widths, original, strict=True)).rstrip())
    count = len(result.rows)
    footer = f"({count} row{'s' if count != 1 else ''}"
    footer += ", truncated at the row limit)" if result.truncated else ")"
    lines.append(footer)
    return "\n".join(lines) + "\n"


# -- commands ---------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    source = open_source(args, settings)
    try:
        result = source.query(args.sql, max_rows=args.max_rows)
    finally:
        source.close()
    if args.format == "json":
        sys.stdout.write(json.dumps(result.to_json(), indent=None, separators=(",", ":")) + "\n")
    elif args.format == "csv":
        sys.stdout.write(result.to_csv())
    else:
        sys.stdout.write(format_table(result))
    if result.truncated:
        print(f"note: only the first {len(result.rows)} rows (QUERY_MAX_ROWS / --max-rows)",
              file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    source = open_source(args, settings)
    try:
        if isinstance(source, ServerSource):
            report = source.export(Path(args.out) if args.out else None)
        else:
            assert isinstance(source, DbSource)
            out = Path(args.out) if args.out else source.path.parent / "lake"
            report = source.export(out)
    finally:
        source.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = ", ".join(f"{table} {count}" for table, count in report["rows"].items())
    print(f"exported {report['requests']} requests ({rows}) to {report['lake']}; "
          f"{len(report['files'])} new files; watermark {report['watermark']}")
    if "copied" in report:
        copied = report["copied"]
        print(f"copied {copied['files']} files to {copied['to']} "
              f"({copied['already_there']} already there)")
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.report import write_report  # matplotlib is imported only for reports

    source = open_source(args, settings)
    try:
        path = write_report(source.query, Path(args.out), source=source.describe())
    finally:
        source.close()
    print(f"wrote {path}")
    return 0


# -- the SQL prompt ---------------------------------------------------------------------------
SQL_HELP = """End each statement with ';' (it may span lines). Read-only: SELECT, WITH, DESCRIBE,
SHOW TABLES, SUMMARIZE, EXPLAIN … Commands:
  .tables            the tables and views
  .schema NAME       the columns of a table or view
  .format FORMAT     table (default), csv or json
  .help              this text
  .quit / .exit      leave (or Ctrl-D)"""


def split_statements(text: str) -> tuple[list[str], str]:
    """The complete statements of ``text`` (each ended by a ``;`` outside quotes and
    ``--`` comments) and the unfinished rest."""
    statements: list[str] = []
    start = 0
    quote: str | None = None
    comment = False
    for index, char in enumerate(text):
        if comment:
            comment = char != "\n"
        elif quote is not None:
            if char == quote:
                quote = None  # a doubled quote closes and reopens: same outcome
        elif char in ("'", '"'):
            quote = char
        elif char == "-" and text.startswith("--", index):
            comment = True
        elif char == ";":
            statement = text[start:index].strip()
            if statement:
                statements.append(statement)
            start = index + 1
    return statements, text[start:]


class SqlShell:
    """The loop of ``python -m pipeline sql``: statements and dot commands in, results out.

    Errors are printed and the prompt goes on; :attr:`failures` counts them (the exit code
    of a non-interactive run is 1 when any statement failed).
    """

    def __init__(self, source: Source, *, fmt: str, out: Any, err: Any) -> None:
        self.source = source
        self.fmt = fmt
        self.out = out
        self.err = err
        self.failures = 0
        self.done = False
        self.buffer = ""

    @property
    def prompt(self) -> str:
        return "   -> " if self.buffer.strip() else "sql> "

    def feed(self, line: str) -> None:
        """One line of input."""
        if not self.buffer.strip() and line.strip().startswith("."):
            self.command(line.strip())
            return
        statements, self.buffer = split_statements(self.buffer + line + "\n")
        for statement in statements:
            self.run(statement)

    def finish(self) -> None:
        """End of input: a last statement without ``;`` still runs."""
        rest = self.buffer.strip()
        self.buffer = ""
        if rest and not all(part.strip().startswith("--") for part in rest.splitlines()):
            self.run(rest)

    def run(self, sql: str) -> None:
        try:
            result = self.source.query(sql)
        except CliError as exc:
            self.failures += 1
            print(f"error: {exc}", file=self.err, flush=True)
            return
        if self.fmt == "json":
            for row in result.to_json()["rows"]:
                self.out.write(json.dumps(dict(zip(result.columns, row, strict=True))) + "\n")
        elif self.fmt == "csv":
            self.out.write(result.to_csv())
        else:
            self.out.write(format_table(result))
        self.out.flush()

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in (".quit", ".exit", ".q"):
            self.done = True
        elif name == ".help":
            print(SQL_HELP, file=self.out, flush=True)
        elif name == ".tables":
            self.run("SELECT DISTINCT table_name AS name, table_type AS kind "
                     "FROM information_schema.tables ORDER BY name")
        elif name == ".schema" and arg:
            self.run("DESCRIBE " + '"' + arg.replace('"', '""') + '"')
        elif name == ".format" and arg in ("table", "csv", "json"):
            self.fmt = arg
        else:
            self.failures += 1
            print(f"error: unknown command {line!r}; .help lists them", file=self.err, flush=True)


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    source = open_source(args, settings)
    interactive = sys.stdin.isatty()
    shell = SqlShell(source, fmt=args.format, out=sys.stdout, err=sys.stderr)
    try:
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401 - line editing and history for input()
            print(f"{source.describe()} (read-only). End statements with ';'; .help, .quit",
                  flush=True)
            while not shell.done:
                try:
                    shell.feed(input(shell.prompt))
                except KeyboardInterrupt:
                    shell.buffer = ""
                    print()
                except EOFError:
                    print()
                    break
        else:
            for line in sys.stdin:
                shell.feed(line.rstrip("\n"))
                if shell.done:
                    break
        if not shell.done:
            shell.finish()
    finally:
        source.close()
    return 1 if shell.failures and not interactive else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description="Query, export and chart the event store.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_source(sub: argparse.ArgumentParser) -> None:
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--server", metavar="URL", help="a running server, e.g. http://127.0.0.1:8080")
        where.add_argument("--db", metavar="PATH", help="the DuckDB file, when no server holds it "
                                                        "(default: DB_PATH)")
        sub.add_argument("--key", help="the server's ADMIN_KEY (default: $ADMIN_KEY)")

    query = commands.add_parser("query", help="run one read-only SQL statement")
    query.add_argument("sql")
    add_source(query)
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")
    query.add_argument("--max-rows", type=int, help="at most this many rows (up to QUERY_MAX_ROWS)")
    query.set_defaults(run=cmd_query)

    export = commands.add_parser("export", help="export closed requests to Parquet")
    add_source(export)
    export.add_argument("--out", metavar="DIR",
                        help="the lake folder (--db: default lake/ beside the file; --server: copy "
                             "the server's lake files here)")
    export.add_argument("--json", action="store_true", help="print the export report as JSON")
    export.set_defaults(run=cmd_export)

    report = commands.add_parser("report", help="write an HTML (or .png) report with charts")
    add_source(report)
    report.add_argument("--out", metavar="FILE", default="report.html", help="report.html or report.png")
    report.set_defaults(run=cmd_report)

    sql = commands.add_parser(
        "sql", help="an interactive SQL prompt (statements from stdin when it is not a terminal)")
    add_source(sql)
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sql.set_defaults(run=cmd_sql)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.run(args, settings)
        return code
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
