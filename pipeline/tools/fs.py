"""File tools confined to the workspace: ``fs.read``, ``fs.write``, ``fs.apply_patch``.

Paths are relative to ``ALLOW_FS_BASE`` and go through :class:`~pipeline.tools.safety.Workspace`
(lexical checks, symlink containment, ``O_NOFOLLOW`` walks, atomic writes). Writes are also
refused inside any ``.git`` folder: a repository's config can make git run programs, so the
model must not be able to write one (see :mod:`pipeline.tools.git`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.tools.registry import Tool
from pipeline.tools.safety import ToolRefusal, Workspace
from pipeline.tools.unidiff import FilePatch, PatchError, apply_hunks, parse_patch

__all__ = ["ApplyPatchParams", "ReadParams", "WriteParams", "fs_tools"]


class ReadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="file path relative to the workspace, e.g. notes.txt")


class WriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="file path relative to the workspace")
    content: str = Field(description="the whole new content of the file (UTF-8 text)")


class ApplyPatchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patch: str = Field(
        min_length=1,
        description="a unified diff (diff -u or git diff); paths relative to the workspace",
    )


def _writable(workspace: Workspace, raw: str) -> tuple[str, ...]:
    for parts in (workspace.parts(raw), workspace.locate(raw)):
        if any(part.lower() == ".git" for part in parts):
            raise ToolRefusal(f"path {raw!r} is inside a .git folder; tools do not write there")
    return workspace.locate(raw)


def _decode(data: bytes) -> tuple[str, bool]:
    """Text of file bytes: invalid UTF-8 replaced; ``binary`` when it holds NUL bytes."""
    return data.decode("utf-8", errors="replace"), b"\x00" in data


def fs_tools(
    workspace: Workspace, *, enabled: bool, disabled_reason: str | None, read_max_bytes: int,
    write_max_bytes: int, timeout_s: float,
) -> list[Tool[Any]]:
    """The three file tools over one workspace."""

    async def read(params: ReadParams) -> dict[str, Any]:
        parts = workspace.locate(params.path)
        result = await asyncio.to_thread(workspace.read, parts, limit=read_max_bytes)
        content, binary = _decode(result.data)
        return {"path": workspace.relative(parts), "content": content, "bytes": result.size,
                "truncated": result.truncated, "binary": binary}

    async def write(params: WriteParams) -> dict[str, Any]:
        data = params.content.encode("utf-8", errors="surrogatepass")
        if len(data) > write_max_bytes:
            raise ToolRefusal(f"content is {len(data)} bytes; the limit is {write_max_bytes} "
                              "(FS_MAX_WRITE_BYTES)")
        parts = _writable(workspace, params.path)
        created = await asyncio.to_thread(workspace.write, parts, data)
        return {"path": workspace.relative(parts), "bytes": len(data), "created": created}

    async def apply_patch(params: ApplyPatchParams) -> dict[str, Any]:
        files = parse_patch(params.patch)
        return await asyncio.to_thread(_apply, workspace, files, write_max_bytes)

    common: dict[str, Any] = {"family": "fs", "enabled": enabled,
                              "disabled_reason": disabled_reason, "timeout_s": timeout_s}
    return [
        Tool(name="fs.read", params=ReadParams, run=read, description=(
            "Read a UTF-8 text file in the workspace. Returns its content (cut at "
            f"{read_max_bytes} bytes, with truncated=true) and its size."), **common),
        Tool(name="fs.write", params=WriteParams, run=write, description=(
            "Create or replace a text file in the workspace with the given content; "
            "folders are created as needed."), **common),
        Tool(name="fs.apply_patch", params=ApplyPatchParams, run=apply_patch, description=(
            "Apply a unified diff to files in the workspace: all files change or none. "
            "Context must match exactly; /dev/null creates or deletes a file."), **common),
    ]


def _apply(workspace: Workspace, files: list[FilePatch], write_max_bytes: int) -> dict[str, Any]:
    """Check every file and compute every new text first; then write, undoing on failure."""
    planned: list[tuple[tuple[str, ...], FilePatch, bytes | None, bytes | None]] = []
    for file in files:
        for name in (file.old_path, file.new_path):
            if name is not None:
                _writable(workspace, name)
        parts = workspace.locate(file.path)
        exists = workspace.exists(parts)
        before: bytes | None = None
        if file.action == "created":
            if exists:
                raise PatchError(f"the patch creates {file.path!r}, which already exists")
            text = ""
        else:
            if not exists:
                raise PatchError(f"the patch changes {file.path!r}, which does not exist")
            result = workspace.read(parts, limit=write_max_bytes)
            if result.truncated:
                raise PatchError(f"{file.path!r} is over {write_max_bytes} bytes (FS_MAX_WRITE_BYTES)")
            before = result.data
            try:
                text = before.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PatchError(f"{file.path!r} is not UTF-8 text; it cannot be patched") from exc
        new_text = apply_hunks(text, file.hunks, path=file.path)
        if file.action == "deleted":
            if new_text:
                raise PatchError(f"the patch deletes {file.path!r} but leaves lines in it")
            after = None
        else:
            after = new_text.encode("utf-8", errors="surrogatepass")
            if len(after) > write_max_bytes:
                raise PatchError(f"patched {file.path!r} would be over {write_max_bytes} bytes")
        planned.append((parts, file, before, after))

    done: list[tuple[tuple[str, ...], bytes | None]] = []
    try:
        for parts, _file, before, after in planned:
            if after is None:
                workspace.delete(parts)
            else:
                workspace.write(parts, after)
            done.append((parts, before))
    except BaseException:
        for parts, before in reversed(done):  # put back what was already changed
            try:
                if before is None:
                    workspace.delete(parts)
                else:
                    workspace.write(parts, before)
            except (OSError, ToolRefusal):
                pass
        raise
    return {"files": [
        {"path": workspace.relative(parts), "action": file.action, "hunks": len(file.hunks)}
        for parts, file, _before, _after in planned
    ]}
