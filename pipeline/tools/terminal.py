"""``terminal.exec``: allowlisted programs, arguments as a list, never a shell.

Every command passes these checks before anything runs; the first that fails is the
refusal (``ok: false``), and no process is started:

1. ``argv`` is a list of 1..``TERMINAL_MAX_ARGS`` strings of at most
   ``TERMINAL_MAX_ARG_CHARS`` characters, with no NUL, newline or other control character.
2. No argument holds shell syntax (``;`` ``|`` ``&`` ``<`` ``>`` `````` ``$(`` ``${``): there
   is no shell, so these would not do what the caller thinks; saying so is more useful than
   passing them on literally.
3. ``argv[0]`` is a bare program name in ``TERMINAL_ALLOWLIST`` (no ``/``), found on
   ``TERMINAL_PATH``.
4. The arguments fit the program's :class:`ProgramPolicy`: only the listed options (so
   ``find -exec``, ``git --upload-pack=…``, ``git -c …``, ``grep -f FILE`` are refused), and
   operands that are paths must stay inside the workspace (``cat ../x``, ``ls /etc`` are
   refused). An allowlisted program without a built-in policy gets the strictest one: no
   argument may start with ``-``.

Then the program runs with ``create_subprocess_exec`` in the workspace, stdin closed, a
minimal environment (``PATH``, ``HOME`` = workspace, ``LANG``; no API keys), in its own
process group. Its stdout and stderr are each capped at ``TOOL_OUTPUT_MAX_BYTES``: past the
cap the process group is killed and the result says ``truncated: true``. Past the timeout
(``timeout_s``, default ``TERMINAL_TIMEOUT_S``, at most ``TERMINAL_MAX_TIMEOUT_S``) the
process group is killed and the call fails. Output is decoded as UTF-8 with replacement
characters, so binary output cannot break anything downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.tools.registry import Tool
from pipeline.tools.safety import ToolRefusal, Workspace, check_text

__all__ = [
    "POLICIES",
    "ExecParams",
    "ProcessRun",
    "ProgramPolicy",
    "check_command",
    "run_process",
    "terminal_tools",
    "which",
]

_SHELL_SYNTAX = re.compile(r"[;|&<>`]|\$\(|\$\{")
_PROGRAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_NUMBER = re.compile(r"^[+-]?\d+[A-Za-z]?$")


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramPolicy:
    """Which arguments one program accepts.

    Attributes:
        flags: Options without a value (``-l``, ``--all``).
        short: Letters that may be combined after one dash (``-la``).
        valued: Options that take a value: the next argument, ``-n5`` or ``--lines=5``.
        operands: ``none``; ``text`` (anything not starting with ``-``); ``paths`` (each must
            stay inside the workspace); ``pattern+paths`` (grep: a pattern unless ``-e`` was
            given, then paths).
        any_option: Every option is fine (``echo``: it only prints).
        subcommands: For ``git``-like programs: the first argument picks a sub-policy.
        find: ``find``'s grammar: paths first, then an expression of allowed predicates.
    """

    flags: frozenset[str] = frozenset()
    short: str = ""
    valued: frozenset[str] = frozenset()
    operands: Literal["none", "text", "paths", "pattern+paths"] = "text"
    any_option: bool = False
    subcommands: Mapping[str, ProgramPolicy] | None = None
    find: bool = False


_STRICT = ProgramPolicy()
_GIT_LOG = ProgramPolicy(
    flags=frozenset({"--oneline", "--stat", "--name-only", "--name-status", "--graph", "--all",
                     "--decorate", "--no-color", "-p", "--patch", "--shortstat", "--reverse"}),
    valued=frozenset({"-n", "--max-count", "--format", "--pretty", "--since", "--until",
                      "--author"}),
    operands="text",
)
_GIT_DIFF = ProgramPolicy(
    flags=frozenset({"--stat", "--name-only", "--name-status", "--cached", "--staged",
                     "--no-color", "--shortstat", "--numstat"}),
    valued=frozenset({"-U", "--unified"}),
    operands="text",
)
POLICIES: Mapping[str, ProgramPolicy] = {
    "echo": ProgramPolicy(any_option=True),
    "pwd": ProgramPolicy(flags=frozenset({"-L", "-P"}), operands="none"),
    "date": ProgramPolicy(flags=frozenset({"-u", "--utc", "-I", "--iso-8601", "-R"}), operands="none"),
    "sleep": ProgramPolicy(operands="text"),
    "ls": ProgramPolicy(short="laAhtrS1dFip", operands="paths",
                        flags=frozenset({"--all", "--almost-all", "--human-readable"})),
    "cat": ProgramPolicy(short="nbsAE", operands="paths"),
    "head": ProgramPolicy(valued=frozenset({"-n", "-c", "--lines", "--bytes"}), short="qv",
                          operands="paths"),
    "tail": ProgramPolicy(valued=frozenset({"-n", "-c", "--lines", "--bytes"}), short="qv",
                          operands="paths"),
    "wc": ProgramPolicy(short="lwcmL", operands="paths"),
    "grep": ProgramPolicy(
        short="nivwlcrFEHhoxsLqI", operands="pattern+paths",
        valued=frozenset({"-e", "-m", "-A", "-B", "-C", "--include", "--exclude",
                          "--exclude-dir", "--max-count"}),
    ),
    "find": ProgramPolicy(find=True),
    "git": ProgramPolicy(subcommands={
        "status": ProgramPolicy(flags=frozenset({"--short", "-s", "--branch", "-b", "--porcelain"}),
                                operands="paths"),
        "log": _GIT_LOG,
        "diff": _GIT_DIFF,
        "show": _GIT_LOG,
        "ls-files": ProgramPolicy(short="cdmoi", flags=frozenset({"--others", "--cached"}),
                                  operands="paths"),
        "rev-parse": ProgramPolicy(flags=frozenset({"--abbrev-ref", "--short", "--show-toplevel",
                                                    "--is-inside-work-tree"}), operands="text"),
        "branch": ProgramPolicy(flags=frozenset({"--list", "--show-current", "-a", "-r", "-v"}),
                                operands="none"),
    }),
}
# git runs with these prepended, so repository config cannot start programs.
_GIT_HARDENING = ("--no-pager", "-c", "core.fsmonitor=false", "-c", "core.pager=cat",
                  "-c", "diff.external=", "-c", "core.hooksPath=/dev/null")

_FIND_VALUED = frozenset({"-name", "-iname", "-path", "-ipath", "-type", "-maxdepth",
                          "-mindepth", "-size", "-mtime", "-mmin", "-newer", "-regex"})
_FIND_FLAGS = frozenset({"-print", "-print0", "-empty", "-o", "-a", "-or", "-and", "-not", "!",
                         "(", ")", "-P", "-depth", "-prune", "-true", "-false"})


class ExecParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(
        min_length=1,
        description='the program and its arguments as a list, e.g. ["ls", "-l"]; no shell',
    )
    timeout_s: float | None = Field(default=None, gt=0, description="seconds before it is killed")


def which(program: str, path_env: str) -> str | None:
    """The program's absolute path on ``path_env`` (never the server's own ``PATH``)."""
    return shutil.which(program, path=path_env)


def check_command(
    argv: Sequence[str], *, allowlist: Sequence[str], workspace: Workspace, max_args: int,
    max_arg_chars: int,
) -> ProgramPolicy:
    """Refuse a command that breaks any rule of the module docstring; return its policy.

    Raises:
        ToolRefusal: With the reason.
    """
    if len(argv) > max_args:
        raise ToolRefusal(f"{len(argv)} arguments; the limit is {max_args} (TERMINAL_MAX_ARGS)")
    for index, arg in enumerate(argv):
        if len(arg) > max_arg_chars:
            raise ToolRefusal(f"argument {index} is {len(arg)} characters; the limit is "
                              f"{max_arg_chars} (TERMINAL_MAX_ARG_CHARS)")
        check_text(arg, what=f"argument {index}")
        shell = _SHELL_SYNTAX.search(arg)
        if shell is not None:
            raise ToolRefusal(
                f"argument {index} ({arg[:60]!r}) holds shell syntax {shell.group()!r}; there is "
                "no shell: give one program and its arguments as a list (no pipes, redirects, "
                "substitutions or command chains)"
            )
    program = argv[0]
    if not _PROGRAM.match(program):
        raise ToolRefusal(f"{program[:60]!r} is not a bare program name (no paths, no spaces)")
    if program not in allowlist:
        raise ToolRefusal(
            f"program {program!r} is not allowed; TERMINAL_ALLOWLIST: {', '.join(allowlist) or 'empty'}"
        )
    policy = POLICIES.get(program, _STRICT)
    args = list(argv[1:])
    if policy.subcommands is not None:
        if not args or args[0] not in policy.subcommands:
            raise ToolRefusal(
                f"{program} needs one of the subcommands {', '.join(policy.subcommands)} first "
                f"(no options before it), got {args[0][:60] if args else 'nothing'!r}"
            )
        sub = args.pop(0)
        policy = policy.subcommands[sub]
        program = f"{program} {sub}"
    if policy.find:
        _check_find(args, workspace)
    else:
        _check_args(program, args, policy, workspace)
    return policy


def _check_args(program: str, args: list[str], policy: ProgramPolicy, workspace: Workspace) -> None:
    operands: list[str] = []
    pattern_given = False
    options_done = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if options_done or arg == "-" or not arg.startswith("-"):
            operands.append(arg)
            continue
        if arg == "--":
            options_done = True
            continue
        if policy.any_option or arg in policy.flags:
            continue
        name, eq, _value = arg.partition("=")
        if eq and name.startswith("--") and name in policy.valued:
            continue
        if arg in policy.valued:
            if i >= len(args):
                raise ToolRefusal(f"{program}: option {arg} needs a value")
            value = args[i]
            i += 1
            if value.startswith("-") and not _NUMBER.match(value):
                raise ToolRefusal(f"{program}: the value of {arg} may not start with '-' ({value[:40]!r})")
            pattern_given |= arg == "-e"
            continue
        if not arg.startswith("--") and len(arg) > 2:
            if all(letter in policy.short for letter in arg[1:]):
                continue
            if arg[:2] in policy.valued:  # -n5
                pattern_given |= arg[:2] == "-e"
                continue
        if len(arg) == 2 and arg[1] in policy.short:
            continue
        allowed = sorted({*policy.flags, *policy.valued, *(f"-{c}" for c in policy.short)})
        raise ToolRefusal(
            f"{program}: option {arg[:60]!r} is not allowed"
            + (f" (allowed: {' '.join(allowed)})" if allowed else " (this program takes no options)")
        )
    match policy.operands:
        case "none":
            if operands:
                raise ToolRefusal(f"{program} takes no operands, got {operands[0][:60]!r}")
        case "paths":
            _check_paths(operands, workspace)
        case "pattern+paths":
            _check_paths(operands if pattern_given else operands[1:], workspace)
        case "text":
            pass


def _check_paths(paths: list[str], workspace: Workspace) -> None:
    for path in paths:
        if path != "-":
            workspace.locate(path, allow_base=True)


def _check_find(args: list[str], workspace: Workspace) -> None:
    i = 0
    while i < len(args) and not args[i].startswith("-") and args[i] not in ("!", "(", ")"):
        workspace.locate(args[i], allow_base=True)
        i += 1
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in _FIND_FLAGS:
            continue
        if arg in _FIND_VALUED:
            if i >= len(args):
                raise ToolRefusal(f"find: {arg} needs a value")
            if arg == "-newer":
                workspace.locate(args[i], allow_base=True)
            i += 1
            continue
        allowed = " ".join(sorted(_FIND_FLAGS | _FIND_VALUED))
        raise ToolRefusal(f"find: {arg[:60]!r} is not allowed (allowed: {allowed}); "
                          "-exec, -delete, -fprint and following links are refused")


@dataclasses.dataclass(slots=True)
class ProcessRun:
    """What a process did: exit code (negative: killed by that signal), capped output."""

    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_ms: int


async def run_process(
    argv: Sequence[str], *, cwd: str, env: Mapping[str, str], timeout_s: float,
    output_max_bytes: int,
) -> ProcessRun:
    """Run a program (never a shell) in its own process group; kill the group on timeout,
    on output over the cap, and when cancelled."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    buffers: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    timed_out = False

    async def pump(name: str, stream: asyncio.StreamReader | None) -> None:
        nonlocal truncated
        if stream is None:  # pragma: no cover - we always pipe both
            return
        buffer = buffers[name]
        while chunk := await stream.read(65_536):
            room = output_max_bytes - len(buffer)
            buffer += chunk[:max(room, 0)]
            if len(chunk) > room:
                truncated = True
                _kill_group(proc)  # enough: stop it rather than drain forever
                # Read on to EOF (discarding): a paused, unread pipe never reports EOF, and
                # proc.wait() waits for the pipes to close as well as for the exit.
                while await stream.read(65_536):
                    pass
                return

    try:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(pump("stdout", proc.stdout), pump("stderr", proc.stderr))
                await proc.wait()
        except TimeoutError:
            timed_out = True
    finally:
        if proc.returncode is None or timed_out:  # timed out: children may hold the pipes
            _kill_group(proc)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    return ProcessRun(
        exit_code=proc.returncode,
        stdout=buffers["stdout"].decode("utf-8", errors="replace"),
        stderr=buffers["stderr"].decode("utf-8", errors="replace"),
        truncated=truncated, timed_out=timed_out,
        duration_ms=round((time.perf_counter() - started) * 1000),
    )


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def terminal_tools(
    workspace: Workspace, *, enabled: bool, disabled_reason: str | None, allowlist: Sequence[str],
    path_env: str, timeout_s: float, max_timeout_s: float, max_args: int, max_arg_chars: int,
    output_max_bytes: int,
) -> list[Tool[Any]]:
    """``terminal.exec`` over one workspace."""
    allowed = tuple(allowlist)

    async def execute(params: ExecParams) -> dict[str, Any]:
        check_command(params.argv, allowlist=allowed, workspace=workspace, max_args=max_args,
                      max_arg_chars=max_arg_chars)
        limit = params.timeout_s if params.timeout_s is not None else timeout_s
        if limit > max_timeout_s:
            raise ToolRefusal(f"timeout_s {limit:g} is over the limit of {max_timeout_s:g} "
                              "(TERMINAL_MAX_TIMEOUT_S)")
        program = which(params.argv[0], path_env)
        if program is None:
            raise ToolRefusal(f"program {params.argv[0]!r} is not installed (TERMINAL_PATH)")
        args = list(params.argv[1:])
        if params.argv[0] == "git":
            sub, rest = args[0], args[1:]
            no_programs = ["--no-ext-diff", "--no-textconv"] if sub in ("diff", "log", "show") else []
            args = [*_GIT_HARDENING, sub, *no_programs, *rest]
        env = {"PATH": path_env, "HOME": str(workspace.base), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "TERM": "dumb", "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
               "GIT_CEILING_DIRECTORIES": str(workspace.base.parent)}
        run = await run_process([program, *args], cwd=str(workspace.base), env=env,
                                timeout_s=limit, output_max_bytes=output_max_bytes)
        if run.timed_out:
            raise ToolRefusal(f"{params.argv[0]} timed out after {limit:g}s; its process group "
                              "was killed")
        return {"argv": list(params.argv), "exit_code": run.exit_code, "stdout": run.stdout,
                "stderr": run.stderr, "truncated": run.truncated}

    names = ", ".join(allowed) or "none"
    return [Tool(
        name="terminal.exec", params=ExecParams, run=execute, family="terminal", enabled=enabled,
        disabled_reason=disabled_reason, timeout_s=max_timeout_s + 5,
        description=(f"Run one allowlisted program ({names}) in the workspace, with arguments "
                     "as a list. There is no shell: no pipes, redirects or globbing. Output is "
                     f"capped at {output_max_bytes} bytes per stream."),
    )]
