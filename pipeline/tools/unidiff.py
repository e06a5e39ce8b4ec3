"""A small, strict unified-diff parser and applier (what ``fs.apply_patch`` uses).

Accepted: ``diff -u`` and ``git diff`` output — optional ``diff --git``/``index``/mode lines,
then per file ``--- old`` / ``+++ new`` and hunks ``@@ -l,s +l,s @@`` whose lines start with
``' '``, ``'-'`` or ``'+'`` (``\\ No newline at end of file`` understood). ``a/``/``b/``
prefixes are stripped when both names carry them; ``/dev/null`` creates or deletes a file.

Refused (:class:`PatchError`): anything else — binary patches, renames and copies, quoted
file names, hunks whose line counts do not add up, context that does not match the file
(there is no fuzz: a hunk applies where its old lines match exactly, searching outward from
the line it names), lines outside any hunk. Applying is pure (text in, text out); the
caller checks paths and writes.
"""

from __future__ import annotations

import dataclasses
import re

from pipeline.tools.safety import ToolRefusal

__all__ = ["FilePatch", "Hunk", "PatchError", "apply_hunks", "parse_patch", "split_lines"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NO_NEWLINE = "\\ No newline at end of file"
_DEV_NULL = "/dev/null"
_GIT_HEADER = ("diff --git ", "index ", "old mode ", "new mode ", "deleted file mode ",
               "new file mode ", "similarity index ", "dissimilarity index ")
_REFUSED_HEADER = ("rename from ", "rename to ", "copy from ", "copy to ", "GIT binary patch",
                   "Binary files ")


class PatchError(ToolRefusal):
    """The patch is malformed, unsupported, or does not apply."""


@dataclasses.dataclass(slots=True)
class Hunk:
    """One ``@@`` hunk: its old and new lines (each ending in ``\\n`` unless marked)."""

    old_start: int
    old: list[str]
    new: list[str]


@dataclasses.dataclass(slots=True)
class FilePatch:
    """The hunks of one file. ``old_path``/``new_path`` are None for ``/dev/null``."""

    old_path: str | None
    new_path: str | None
    hunks: list[Hunk]

    @property
    def path(self) -> str:
        """The file this patch changes (the new name, or the old one for a deletion)."""
        path = self.new_path or self.old_path
        assert path is not None
        return path

    @property
    def action(self) -> str:
        if self.old_path is None:
            return "created"
        return "deleted" if self.new_path is None else "modified"


def split_lines(text: str) -> list[str]:
    """Lines with their ``\\n`` kept (only ``\\n`` ends a line: a ``\\r`` is content)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _name(raw: str, line_no: int) -> str:
    name = raw.split("\t", 1)[0].rstrip()  # diff -u appends a tab and a timestamp
    if not name:
        raise PatchError(f"line {line_no}: a file header without a file name")
    if name.startswith('"'):
        raise PatchError(f"line {line_no}: quoted file names are not supported ({name[:80]})")
    return name


def parse_patch(patch: str) -> list[FilePatch]:
    """Parse a unified diff into file patches.

    Raises:
        PatchError: When the patch is malformed or uses an unsupported feature.
    """
    lines = patch.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(_REFUSED_HEADER):
            raise PatchError(f"line {i + 1}: binary patches, renames and copies are not supported")
        if line.startswith(_GIT_HEADER) or not line.strip():
            i += 1
            continue
        if not line.startswith("--- "):
            raise PatchError(f"line {i + 1}: expected a '--- old' file header, got {line[:80]!r}")
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"line {i + 1}: '--- ' is not followed by a '+++ ' file header")
        old = _name(line[4:], i + 1)
        new = _name(lines[i + 1][4:], i + 2)
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i)
            hunks.append(hunk)
        if not hunks:
            raise PatchError(f"line {i}: file {new!r} has no hunks")
        files.append(_file_patch(old, new, hunks, i))
    if not files:
        raise PatchError("the patch holds no file changes")
    seen: set[str] = set()
    for file in files:
        if file.path in seen:
            raise PatchError(f"the patch changes {file.path!r} twice; merge the hunks")
        seen.add(file.path)
    return files


def _file_patch(old: str, new: str, hunks: list[Hunk], line_no: int) -> FilePatch:
    if old == _DEV_NULL and new == _DEV_NULL:
        raise PatchError(f"line {line_no}: both file names are /dev/null")
    if old != _DEV_NULL and new != _DEV_NULL and old.startswith("a/") and new.startswith("b/"):
        old, new = old[2:], new[2:]
    elif old == _DEV_NULL and new.startswith("b/"):
        new = new[2:]
    elif new == _DEV_NULL and old.startswith("a/"):
        old = old[2:]
    old_path = None if old == _DEV_NULL else old
    new_path = None if new == _DEV_NULL else new
    if old_path is not None and new_path is not None and old_path != new_path:
        raise PatchError(
            f"the patch renames {old_path!r} to {new_path!r}; renames are not supported"
        )
    return FilePatch(old_path, new_path, hunks)


def _parse_hunk(lines: list[str], i: int) -> tuple[Hunk, int]:
    match = _HUNK.match(lines[i])
    if match is None:
        raise PatchError(f"line {i + 1}: malformed hunk header {lines[i][:80]!r}")
    old_start = int(match.group(1))
    old_count = int(match.group(2) if match.group(2) is not None else 1)
    new_count = int(match.group(4) if match.group(4) is not None else 1)
    header = i + 1
    i += 1
    old: list[str] = []
    new: list[str] = []
    last: str | None = None
    while len(old) < old_count or len(new) < new_count:
        if i >= len(lines):
            raise PatchError(f"line {header}: the hunk ends early (expected {old_count} old and "
                             f"{new_count} new lines, got {len(old)} and {len(new)})")
        line = lines[i]
        tag, body = (line[:1], line[1:] + "\n") if line else (" ", "\n")  # blank = empty context
        if tag == " ":
            old.append(body)
            new.append(body)
        elif tag == "-":
            old.append(body)
        elif tag == "+":
            new.append(body)
        elif line.startswith(_NO_NEWLINE):
            _strip_newline(last, old, new, i)
            i += 1
            continue
        else:
            raise PatchError(f"line {i + 1}: unexpected line in a hunk: {line[:80]!r}")
        last = tag
        i += 1
    if len(old) != old_count or len(new) != new_count:
        raise PatchError(f"line {header}: the hunk's line counts do not match its header")
    if i < len(lines) and lines[i].startswith(_NO_NEWLINE):
        _strip_newline(last, old, new, i)
        i += 1
    return Hunk(old_start=old_start, old=old, new=new), i


def _strip_newline(last: str | None, old: list[str], new: list[str], i: int) -> None:
    if last is None:
        raise PatchError(f"line {i + 1}: '\\ No newline' without a line before it")
    if last in (" ", "-"):
        old[-1] = old[-1].removesuffix("\n")
    if last in (" ", "+"):
        new[-1] = new[-1].removesuffix("\n")


def apply_hunks(text: str, hunks: list[Hunk], *, path: str) -> str:
    """Apply hunks to a file's text; each must match exactly (no fuzz).

    Raises:
        PatchError: When a hunk's old lines are nowhere to be found after the previous hunk.
    """
    lines = split_lines(text)
    out: list[str] = []
    cursor = 0  # lines before this index are settled
    for number, hunk in enumerate(hunks, start=1):
        if hunk.old:
            at = _find(lines, hunk.old, start=max(hunk.old_start - 1, 0), floor=cursor)
        else:  # a pure insertion goes after line old_start (0: at the top)
            at = hunk.old_start if cursor <= hunk.old_start <= len(lines) else None
        if at is None:
            raise PatchError(
                f"hunk {number} of {path!r} does not apply: its context (from line "
                f"{hunk.old_start}) does not match the file"
            )
        out += lines[cursor:at]
        out += hunk.new
        cursor = at + len(hunk.old)
    out += lines[cursor:]
    return "".join(out)


def _find(lines: list[str], old: list[str], *, start: int, floor: int) -> int | None:
    size = len(old)
    last = len(lines) - size
    for distance in range(max(last, 0) + len(lines) + 1):
        for candidate in (start - distance, start + distance) if distance else (start,):
            if floor <= candidate <= last and lines[candidate:candidate + size] == old:
                return candidate
        if start - distance < floor and start + distance > last:
            return None
    return None
