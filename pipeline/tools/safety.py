"""Path confinement: every file a tool touches is inside one base folder, by construction.

A tool path is checked twice:

1. **Lexically** (:meth:`Workspace.parts`): a non-empty relative POSIX path, at most
   ``FS_MAX_PATH_CHARS`` characters and 255 bytes per name, with no NUL or other control
   character, no backslash, no ``..`` component, not absolute (``/``, ``~``, ``C:``). The same
   rules hold for its percent-decoded form, so ``%2e%2e/x`` is refused like ``../x``.
2. **On disk** (:meth:`Workspace.locate`): the path is resolved (symlinks followed) and must
   stay inside the base; a symlink pointing out of it is refused.

Files are then opened by walking the *resolved* path one component at a time from a file
descriptor of the base, each step with ``O_NOFOLLOW``: a symlink swapped in between the check
and the open makes the open fail instead of escaping (no time-of-check/time-of-use gap).
Writes go to a temporary file in the target's folder and are renamed over the target, so a
write never goes *through* an existing link (a hard link keeps its old content) and a
reader never sees half a file. Special files (FIFOs, devices) are refused, so a read can
never block.

Every refusal is a :class:`ToolRefusal` whose message says what was wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from core.errors import PipelineError

__all__ = ["ReadResult", "ToolRefusal", "Workspace", "check_text"]

_NAME_MAX_BYTES = 255
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ToolRefusal(PipelineError):
    """A tool refused its input. The message is shown to the model and the client as is."""


def check_text(value: str, *, what: str) -> None:
    """Refuse control characters (NUL, CR, LF, …) in a single-line value."""
    match = _CONTROL.search(value)
    if match is not None:
        raise ToolRefusal(
            f"{what} contains a control character ({match.group()!r} at {match.start()}); "
            "NUL bytes and line breaks are not allowed"
        )


class ReadResult:
    """What :meth:`Workspace.read` returns: the bytes read, the file size, whether cut."""

    __slots__ = ("data", "size", "truncated")

    def __init__(self, data: bytes, size: int, truncated: bool) -> None:
        self.data = data
        self.size = size
        self.truncated = truncated


class Workspace:
    """The base folder tools are confined to; created when missing.

    Args:
        base: The folder (``ALLOW_FS_BASE``).
        max_path_chars: Longer tool paths are refused (``FS_MAX_PATH_CHARS``).
    """

    def __init__(self, base: Path | str, *, max_path_chars: int = 1024) -> None:
        Path(base).mkdir(parents=True, exist_ok=True)
        self.base = Path(os.path.realpath(base))
        self.max_path_chars = max_path_chars

    # -- checks -----------------------------------------------------------------------
    def parts(self, raw: str, *, allow_base: bool = False) -> tuple[str, ...]:
        """The lexically checked components of a tool path (``.`` and empty ones dropped).

        Raises:
            ToolRefusal: For any of the rules in the module docstring.
        """
        if not isinstance(raw, str):  # pragma: no cover - pydantic guarantees str
            raise ToolRefusal("path must be a string")
        if len(raw) > self.max_path_chars:
            raise ToolRefusal(
                f"path is {len(raw)} characters long; the limit is {self.max_path_chars} "
                "(FS_MAX_PATH_CHARS)"
            )
        parts = self._lexical(raw, shown=raw)
        decoded = raw
        for _ in range(3):  # double and triple encodings too: %252e%252e
            step = unquote(decoded)
            if step == decoded:
                break
            decoded = step
            self._lexical(decoded, shown=raw, encoded=True)
        if not parts and not allow_base:
            raise ToolRefusal(f"path {raw!r} names the base folder itself, not a file in it")
        return parts

    def _lexical(self, path: str, *, shown: str, encoded: bool = False) -> tuple[str, ...]:
        how = " (once percent-decoded)" if encoded else ""
        if "\x00" in path:
            raise ToolRefusal(f"path {shown!r} contains a NUL byte{how}")
        check_text(path, what=f"path {shown!r}{how}")
        if not path.strip():
            raise ToolRefusal("path is empty")
        if "\\" in path:
            raise ToolRefusal(f"path {shown!r} contains a backslash{how}; use '/' between names")
        if path.startswith(("/", "~")) or _DRIVE.match(path):
            raise ToolRefusal(
                f"path {shown!r} is absolute{how}; give a path relative to the base folder"
            )
        parts = tuple(part for part in path.split("/") if part not in ("", "."))
        if ".." in parts:
            raise ToolRefusal(f"path {shown!r} contains '..'{how}; paths stay inside the base folder")
        for part in parts:
            if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX_BYTES:
                raise ToolRefusal(f"a name in path {shown!r} is over {_NAME_MAX_BYTES} bytes")
        return parts

    def locate(self, raw: str, *, allow_base: bool = False) -> tuple[str, ...]:
        """The components of the path *resolved* (symlinks followed), relative to the base.

        Raises:
            ToolRefusal: When the lexical checks fail or the path resolves outside the base.
        """
        parts = self.parts(raw, allow_base=allow_base)
        resolved = Path(os.path.realpath(self.base.joinpath(*parts)))
        if resolved != self.base and self.base not in resolved.parents:
            raise ToolRefusal(
                f"path {raw!r} leads outside the base folder (through a symbolic link)"
            )
        real = resolved.relative_to(self.base).parts
        if not real and not allow_base:
            raise ToolRefusal(f"path {raw!r} names the base folder itself, not a file in it")
        return real

    def relative(self, parts: tuple[str, ...]) -> str:
        """The display form of resolved components (``.`` for the base)."""
        return "/".join(parts) or "."

    # -- descriptors ------------------------------------------------------------------
    @contextlib.contextmanager
    def _dir(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder ``parts`` inside the base, walked with O_NOFOLLOW."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                try:
                    child = os.open(name, flags, dir_fd=fd)
                except OSError as exc:
                    raise _refusal(exc, name, link=_is_link(name, fd)) from exc
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def is_dir(self, parts: tuple[str, ...]) -> bool:
        """Whether resolved ``parts`` name an existing folder (no link followed)."""
        try:
            with self._dir(parts):
                return True
        except (ToolRefusal, OSError):
            return False

    def exists(self, parts: tuple[str, ...]) -> bool:
        """Whether resolved ``parts`` name an existing entry (no link followed)."""
        if not parts:
            return True
        try:
            with self._dir(parts[:-1]) as fd:
                os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                return True
        except (ToolRefusal, OSError):
            return False

    # -- file operations (blocking: run them in a thread) -----------------------------
    def read(self, parts: tuple[str, ...], *, limit: int) -> ReadResult:
        """Read at most ``limit`` bytes of a regular file.

        Raises:
            ToolRefusal: Missing, a folder, a special file, or a link swapped in.
        """
        with self._dir(parts[:-1]) as dir_fd:
            try:
                fd = os.open(
                    parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )
            except OSError as exc:
                raise _refusal(exc, "/".join(parts), link=_is_link(parts[-1], dir_fd)) from exc
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ToolRefusal(f"{self.relative(parts)!r} is a folder, not a file")
            if not stat.S_ISREG(info.st_mode):
                raise ToolRefusal(f"{self.relative(parts)!r} is not a regular file")
            chunks: list[bytes] = []
            remaining = limit + 1  # one more byte tells us whether the file goes on
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
            return ReadResult(data[:limit], max(info.st_size, len(data)), len(data) > limit)
        finally:
            os.close(fd)

    def write(self, parts: tuple[str, ...], data: bytes) -> bool:
        """Write a whole file atomically (temporary file, then rename); folders are created.

        Returns:
            True when the file was created, False when replaced.

        Raises:
            ToolRefusal: The target is a folder or a special file, or a link was swapped in.
        """
        if not parts:
            raise ToolRefusal("cannot write the base folder itself")
        name = parts[-1]
        with self._dir(parts[:-1], create=True) as dir_fd:
            mode = 0o644
            created = True
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(info.st_mode):
                    raise ToolRefusal(f"{self.relative(parts)!r} is a folder, not a file")
                if stat.S_ISREG(info.st_mode):
                    mode = stat.S_IMODE(info.st_mode)
                elif not stat.S_ISLNK(info.st_mode):
                    raise ToolRefusal(f"{self.relative(parts)!r} is not a regular file")
                created = False
            temp = f".{name[:200]}.{uuid.uuid4().hex[:12]}.tmp"
            fd = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                dir_fd=dir_fd,
            )
            try:
                try:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                finally:
                    os.close(fd)
                # rename replaces the directory entry: it never writes through a link.
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
            return created

    def delete(self, parts: tuple[str, ...]) -> None:
        """Remove a regular file (never a folder; a link is removed, not its target)."""
        with self._dir(parts[:-1]) as dir_fd:
            try:
                info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                raise _refusal(exc, "/".join(parts)) from exc
            if stat.S_ISDIR(info.st_mode):
                raise ToolRefusal(f"{self.relative(parts)!r} is a folder, not a file")
            os.unlink(parts[-1], dir_fd=dir_fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refusal(exc: OSError, name: str, *, link: bool = False) -> ToolRefusal:
    if link:  # O_NOFOLLOW met a link the resolved path did not have: it was swapped in
        return ToolRefusal(f"{name!r} is a symbolic link that changed during the call")
    match exc.errno:
        case errno.ENOENT:
            return ToolRefusal(f"{name!r} does not exist")
        case errno.ELOOP:
            return ToolRefusal(f"{name!r} is a symbolic link that changed during the call")
        case errno.ENOTDIR:
            return ToolRefusal(f"{name!r} is not a folder")
        case errno.EACCES | errno.EPERM:
            return ToolRefusal(f"permission denied: {name!r}")
        case _:
            return ToolRefusal(f"cannot open {name!r}: {exc.strerror or exc}")
