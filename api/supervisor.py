"""The supervisor of ``python server.py --workers N`` (issue 13): N worker processes on one
port, restarted when they die, stopped together.

The parent is neither a worker nor the recorder: it opens no store and serves nothing.
Each child is ``server.py`` again with ``WORKERS=1`` and ``REUSE_PORT=true``; every child
listens on the same port with ``SO_REUSEPORT`` and the kernel spreads the connections
over them. The parent holds the port (bound, not listening) so that no other program
takes it between restarts, and so that ``PORT=0`` means one free port for every worker.

* A child that dies is started again (a new process, so a new worker id), after a
  backoff that grows while it keeps dying young (up to ``WORKER_RESTART_MAX_S``); a child
  that exits 2 (invalid settings) stops everything with exit code 2, and one that keeps
  dying at once (10 times within its first second) stops everything with exit code 1.
* SIGTERM (or SIGINT) to the parent goes on to every worker, which drains its turns in
  ``SHUTDOWN_GRACE_S`` (the parent waits that long plus :data:`STOP_MARGIN_S`, then kills
  what is left), then to the recorder, which records what they appended (another
  :data:`STOP_MARGIN_S` at most); the parent exits 0 when every child exited cleanly (1
  otherwise).
* Children get SIGTERM when the parent dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``).

The plan of children is :func:`children`: one recorder (``--role recorder``, the only
process that opens ``DB_PATH``, fed from the Redis log) and the workers (``--role
worker``, whose store is the recorder's, over its loopback API).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from core.config import Settings

log = logging.getLogger("supervisor")

#: Seconds the parent waits beyond ``SHUTDOWN_GRACE_S`` for its children to exit.
STOP_MARGIN_S = 10.0
#: A child that exits within this long of starting "died young" (crash loop detection).
YOUNG_S = 1.0
MAX_YOUNG_DEATHS = 10


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """One child of the plan: its name (``worker-1``, ``recorder``), role, command, env."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]


def children(settings: Settings, *, server: str, port: int,
             recorder_port: int) -> list[ChildSpec]:
    """The processes the supervisor keeps running: the recorder, the only process that
    opens ``DB_PATH``, and ``WORKERS`` workers pointed at its internal API, each
    ``server.py`` with its settings in the environment."""
    # The recorder's internal API reads and writes the whole store: only this plan's
    # workers may call it (any local process could reach its loopback port otherwise).
    token = settings.recorder_token or secrets.token_urlsafe(32)
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "HOST": settings.host, "PORT": str(port),
            "EVENT_LOG": settings.event_log, "WORKERS": "1", "ROLE": "single",
            "RECORDER_TOKEN": token}
    if settings.allow_no_auth:
        base["ALLOW_NO_AUTH"] = "true"
    plan = [ChildSpec(
        name="recorder", role="recorder",
        argv=[sys.executable, server, "--role", "recorder", "--recorder-port",
              str(recorder_port)],
        env={**base, "DB_PATH": str(settings.db_path)})]
    worker_args = ["--role", "worker", "--recorder-url", f"http://127.0.0.1:{recorder_port}"]
    for slot in range(1, settings.workers + 1):
        plan.append(ChildSpec(name=f"worker-{slot}", role="worker",
                              argv=[sys.executable, server, *worker_args],
                              # the recorder's lake: GET /v1/export reads it
                              env={**base, "REUSE_PORT": "true",
                                   "EXPORT_DIR": str(settings.lake_dir)}))
    return plan


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux ``prctl``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    young_deaths: int = 0
    restarts: int = 0


class Supervisor:
    """Keeps the plan's children running until asked to stop (see the module docstring)."""

    def __init__(self, settings: Settings, plan: list[ChildSpec]) -> None:
        self.settings = settings
        self.children = [_Child(spec) for spec in plan]
        self._stop: int | None = None

    def _signalled(self, signum: int, _frame: FrameType | None) -> None:
        self._stop = signum

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(child.spec.argv, env=child.spec.env,
                                      preexec_fn=_die_with_parent)
        child.started = time.monotonic()
        log.info("%s started (pid %d)", child.spec.name, child.proc.pid)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit code."""
        previous = {sig: signal.signal(sig, self._signalled)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            code = self._watch()
            if code is not None:
                self._stop_all()
                return code
            log.info("stopping: SIGTERM to the %d workers, then the recorder",
                     len(self.children) - 1)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> int | None:
        """Restart dead children until a stop signal (None) or a fatal exit (its code)."""
        while self._stop is None:
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                if proc is None:
                    if now >= child.restart_at:
                        child.restarts += 1
                        self._start(child)
                    continue
                code = proc.poll()
                if code is None:
                    if child.young_deaths and now - child.started > 10 * YOUNG_S:
                        child.young_deaths = 0  # it lives: forget its past
                    continue
                if self._stop is not None:
                    break
                lived = now - child.started
                if code == 2:
                    log.error("%s (pid %d) exited 2 (invalid settings); stopping",
                              child.spec.name, proc.pid)
                    return 2
                child.young_deaths = child.young_deaths + 1 if lived < YOUNG_S else 0
                if child.young_deaths >= MAX_YOUNG_DEATHS:
                    log.error("%s died %d times within %.0fs of starting; stopping (its log "
                              "says why)", child.spec.name, child.young_deaths, YOUNG_S)
                    return 1
                delay = min(self.settings.worker_restart_max_s,
                            0.1 * 2 ** max(0, child.young_deaths - 1))
                log.warning("%s (pid %d) died with exit code %s after %.1fs; restarting in %.1fs",
                            child.spec.name, proc.pid, code, lived, delay)
                child.proc = None
                child.restart_at = now + delay
            time.sleep(0.05)
        return None

    def _stop_all(self) -> int:
        """Stop the workers (their turns get ``SHUTDOWN_GRACE_S``), then the recorder, so it
        records everything the workers appended before they exited; the exit code."""
        workers = [c for c in self.children if c.spec.role != "recorder"]
        recorders = [c for c in self.children if c.spec.role == "recorder"]
        clean = self._stop_group(workers, self.settings.shutdown_grace_s + STOP_MARGIN_S)
        clean = self._stop_group(recorders, STOP_MARGIN_S) and clean
        log.info("every child has exited%s", "" if clean else " (not all cleanly)")
        return 0 if clean else 1

    def _stop_group(self, children: list[_Child], bound_s: float) -> bool:
        """SIGTERM to ``children``, wait up to ``bound_s`` (then kill); whether all stopped
        cleanly."""
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + bound_s
        clean = True
        for child in children:
            if child.proc is None:
                continue
            proc = child.proc
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop within %.0fs; killing it", child.spec.name,
                          proc.pid, bound_s)
                proc.kill()
                proc.wait()
                clean = False
                continue
            if code not in (0, -signal.SIGTERM, 130):  # stopped while still starting (130: SIGINT)
                log.error("%s (pid %d) exited with %s on stop", child.spec.name, proc.pid, code)
                clean = False
        return clean


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT: the workers join it, nobody else
    can take it; with port 0 the OS picks one for all of them.

    Raises:
        OSError: the port is taken or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def supervise(settings: Settings, *, server: str) -> int:
    """Run the supervisor of the recorder and ``settings.workers`` workers; its exit code (0
    after a clean stop, 1 when the port cannot be had or the children keep dying, 2 for
    settings)."""
    try:
        held = reserve_port(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot start: cannot listen on %s:%s (%s): stop what holds it, or choose "
                  "another port with PORT=… or --port", settings.host, settings.port,
                  exc.strerror or exc)
        return 1
    with socket.socket() as probe:  # the recorder's internal API: a free loopback port
        probe.bind(("127.0.0.1", 0))
        recorder_port = int(probe.getsockname()[1])
    try:
        port = int(held.getsockname()[1])
        plan = children(settings, server=server, port=port, recorder_port=recorder_port)
        log.info("supervising %d workers and the recorder on http://%s:%d (pid %d)",
                 settings.workers, settings.host, port, os.getpid())
        return Supervisor(settings, plan).run()
    finally:
        held.close()
