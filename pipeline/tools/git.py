"""``git.status`` of a repository inside the workspace, run so that git cannot be turned
against the host.

- The repository is found by us, not by git: walking up from the asked folder to the base,
  the first ``.git`` that is a real folder (not a link, not a ``gitdir:`` file pointing
  elsewhere). Git then runs with ``GIT_DIR``/``GIT_WORK_TREE`` set to it and
  ``GIT_CEILING_DIRECTORIES`` above the base, so it never looks outside.
- Repository config can make ``git status`` run programs (``core.fsmonitor``, clean/smudge
  filters, …). We pass ``-c core.fsmonitor=false``, ignore system and global config, and refuse
  a repository whose ``.git/config`` names a program or includes other files. (The fs tools
  refuse to write inside ``.git``, so a model cannot plant such config.)
- No shell, a minimal environment (no API keys), a timeout that kills the process group,
  output capped.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.tools.registry import Tool
from pipeline.tools.safety import ToolRefusal, Workspace
from pipeline.tools.terminal import run_process, which

__all__ = ["GitStatusParams", "git_tools", "parse_porcelain"]

# Config keys whose value is a program git may run, and include directives.
_RISKY_CONFIG = re.compile(
    r"^\s*(?:fsmonitor|clean|smudge|process|textconv|command|sshcommand|askpass|pager|editor|"
    r"hookspath|gpgprogram|program|helper|cmd|tool|external)\s*=|^\s*\[\s*include",
    re.IGNORECASE | re.MULTILINE,
)
_CONFIG_MAX_BYTES = 65_536


class GitStatusParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        description="a folder inside the repository, relative to the workspace (default: the workspace)",
    )


def _find_repository(workspace: Workspace, parts: tuple[str, ...]) -> tuple[str, ...]:
    for depth in range(len(parts), -1, -1):
        candidate = (*parts[:depth], ".git")
        if workspace.is_dir(candidate):
            return parts[:depth]
        if workspace.exists(candidate):
            raise ToolRefusal(
                f"{workspace.relative(candidate)!r} is not a folder (a linked worktree, a submodule "
                "or a link); only plain repositories are supported"
            )
    raise ToolRefusal(f"{workspace.relative(parts)!r} is not inside a git repository in the workspace")


def parse_porcelain(output: str) -> dict[str, Any]:
    """Parse ``git status --porcelain=v1 --branch -z`` output."""
    fields = output.split("\0")
    branch: str | None = None
    entries: list[dict[str, str]] = []
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if not item:
            continue
        if item.startswith("## "):
            branch = item[3:]
            continue
        entry = {"status": item[:2], "path": item[3:]}
        if item[:1] in "RC" and i < len(fields):  # renames and copies: the source follows
            entry["orig_path"] = fields[i]
            i += 1
        entries.append(entry)
    return {"branch": branch, "entries": entries, "clean": not entries}


def git_tools(
    workspace: Workspace, *, enabled: bool, disabled_reason: str | None, path_env: str,
    timeout_s: float, output_max_bytes: int,
) -> list[Tool[Any]]:
    """The git tools over one workspace."""

    async def status(params: GitStatusParams) -> dict[str, Any]:
        parts = workspace.locate(params.path or ".", allow_base=True)
        if not workspace.is_dir(parts):
            raise ToolRefusal(f"{workspace.relative(parts)!r} is not a folder")
        root = _find_repository(workspace, parts)
        config = await asyncio.to_thread(_read_config, workspace, root)
        if _RISKY_CONFIG.search(config):
            raise ToolRefusal(
                f"the repository at {workspace.relative(root)!r} has config that can run programs "
                "(fsmonitor, filters, pagers, includes, …); git.status refuses it"
            )
        git = which("git", path_env)
        if git is None:
            raise ToolRefusal("git is not installed (not found on TERMINAL_PATH)")
        top = workspace.base.joinpath(*root)
        inside = "/".join(parts[len(root):]) or "."
        env = {
            "PATH": path_env, "HOME": str(workspace.base), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "GIT_DIR": str(top / ".git"), "GIT_WORK_TREE": str(top),
            "GIT_CEILING_DIRECTORIES": str(workspace.base.parent),
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat",
        }
        argv = [git, "--no-pager", "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false",
                "status", "--porcelain=v1", "--branch", "-z", "--untracked-files=normal",
                "--", inside]
        run = await run_process(argv, cwd=str(top), env=env, timeout_s=timeout_s,
                                output_max_bytes=output_max_bytes)
        if run.timed_out:
            raise ToolRefusal(f"git status timed out after {timeout_s:g}s (GIT_TIMEOUT_S)")
        if run.exit_code != 0:
            raise ToolRefusal(f"git status failed ({run.exit_code}): {run.stderr.strip()[:500]}")
        parsed = parse_porcelain(run.stdout)
        return {"repository": workspace.relative(root), "path": workspace.relative(parts),
                **parsed, "truncated": run.truncated}

    return [Tool(
        name="git.status", params=GitStatusParams, run=status, family="git", enabled=enabled,
        disabled_reason=disabled_reason, timeout_s=timeout_s + 5,
        description=("Show the git status (branch, changed and untracked files) of a repository "
                     "inside the workspace."),
    )]


def _read_config(workspace: Workspace, root: tuple[str, ...]) -> str:
    parts = (*root, ".git", "config")
    if not workspace.exists(parts):
        return ""
    result = workspace.read(parts, limit=_CONFIG_MAX_BYTES)
    if result.truncated:
        raise ToolRefusal("the repository's .git/config is too large to check")
    return result.data.decode("utf-8", errors="replace")
