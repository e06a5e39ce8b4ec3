"""Tools, one by one, with a temporary workspace: the registry, fs, patches, git, terminal.

Every bad input gets ``ok: false`` with a clear error, and the test asserts that nothing was
written (the whole temporary tree is snapshotted before and after) and nothing was run (a
spy on process creation, and canary files a command would have created).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from core.config import Settings
from pipeline.tools import Tool, ToolOutcome, ToolRegistry, Workspace, build_registry
from pipeline.tools import terminal as terminal_module
from pipeline.tools.safety import ToolRefusal
from pipeline.tools.terminal import run_process
from pipeline.tools.unidiff import PatchError, apply_hunks, parse_patch

HAS_GIT = shutil.which("git") is not None


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """``tmp/base`` is the workspace; ``tmp/outside`` holds a secret next to it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    workspace = tmp_path / "base"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("alpha\nbeta\ngamma\n")
    (workspace / "sub").mkdir()
    (workspace / "sub" / "inner.txt").write_text("inner\n")
    (workspace / "link_out").symlink_to(outside / "secret.txt")
    (workspace / "dir_out").symlink_to(outside)
    (workspace / "dangling_out").symlink_to(outside / "new.txt")
    (workspace / "link_in").symlink_to(workspace / "sub" / "inner.txt")
    return workspace


def registry_for(base: Path, **overrides: Any) -> ToolRegistry:
    options: dict[str, Any] = {"db_path": base.parent / "events.duckdb", "allow_fs_base": base}
    options.update(overrides)
    return build_registry(Settings(**options))


@pytest.fixture
def registry(base: Path) -> ToolRegistry:
    return registry_for(base, terminal_allowlist=[
        "echo", "ls", "cat", "head", "tail", "wc", "grep", "find", "sleep", "git", "pwd"])


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``root``: files with their bytes, links with their targets."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = ("dir", b"")
            else:
                out[key] = ("file", path.read_bytes())
    return out


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every process the tools start (they still start: this only records them)."""
    calls: list[tuple[str, ...]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*argv: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        calls.append(tuple(str(a) for a in argv))
        return await real(*argv, **kwargs)

    monkeypatch.setattr(terminal_module.asyncio, "create_subprocess_exec", spy)
    return calls


async def refused(registry: ToolRegistry, name: str, params: Any, *, match: str) -> ToolOutcome:
    outcome = await registry.execute(name, params)
    assert outcome.ok is False, outcome
    assert outcome.data is None
    assert outcome.error is not None and match.lower() in outcome.error.lower(), outcome.error
    assert outcome.error.startswith(name) or "unknown tool" in outcome.error, outcome.error
    return outcome


# -- the registry --------------------------------------------------------------------------
def test_every_tool_is_registered_with_a_schema(registry: ToolRegistry) -> None:
    names = [tool.name for tool in registry.tools]
    assert names == ["fs.read", "fs.write", "fs.apply_patch", "git.status", "terminal.exec",
                     "speech.transcribe", "speech.synthesize"]
    offered = registry.offered()
    # No audio client here: the speech tools are listed but not offered.
    assert [spec["function"]["name"] for spec in offered] == [
        "fs_read", "fs_write", "fs_apply_patch", "git_status", "terminal_exec"]
    read = offered[0]["function"]
    assert read["parameters"]["properties"]["path"]["type"] == "string"
    assert read["parameters"]["required"] == ["path"]
    assert read["parameters"]["additionalProperties"] is False
    speech = registry.resolve("speech.synthesize")
    assert speech is not None and not speech.enabled
    assert speech.disabled_reason == "no speech provider configured"
    assert registry.resolve("fs_read") is registry.resolve("fs.read")


async def test_settings_switch_tools_off(base: Path) -> None:
    registry = registry_for(base, enable_terminal=False, disabled_tools=["fs.write"])
    enabled = [tool.name for tool in registry.enabled()]
    assert "terminal.exec" not in enabled and "fs.write" not in enabled and "fs.read" in enabled
    await refused(registry, "terminal.exec", {"argv": ["echo", "hi"]}, match="ENABLE_TERMINAL=false")
    await refused(registry, "fs.write", {"path": "x.txt", "content": "x"}, match="DISABLED_TOOLS")
    assert not (base / "x.txt").exists()


async def test_the_workspace_is_created_on_start(tmp_path: Path) -> None:
    registry = registry_for(tmp_path / "new" / "ws")
    assert (tmp_path / "new" / "ws").is_dir()
    assert registry.info["workspace"] == str((tmp_path / "new" / "ws").resolve())


async def test_default_workspace_is_beside_the_store(tmp_path: Path) -> None:
    settings = Settings(db_path=tmp_path / "d" / "events.duckdb")
    assert settings.fs_base == tmp_path / "d" / "workspace"


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("no.such.tool", {}, "unknown tool 'no.such.tool'"),
        ("fs.read", {}, "path: Field required"),
        ("fs.read", {"path": 3}, "path: Input should be a valid string"),
        ("fs.read", {"path": "notes.txt", "mode": "rb"}, "mode: Extra inputs are not permitted"),
        ("terminal.exec", {"argv": "echo hi"}, "argv: Input should be a valid list"),
        ("terminal.exec", {"argv": []}, "argv: List should have at least 1 item"),
        ("fs.read", "{not json", "arguments are not valid JSON"),
        ("fs.read", "[1, 2]", "arguments must be a JSON object"),
        ("fs.read", '"notes.txt"', "arguments must be a JSON object"),
    ],
)
async def test_bad_calls_are_refused(
    registry: ToolRegistry, base: Path, name: str, params: Any, match: str
) -> None:
    before = snapshot(base.parent)
    await refused(registry, name, params, match=match)
    assert snapshot(base.parent) == before


async def test_oversized_arguments_are_refused(base: Path) -> None:
    registry = registry_for(base, tool_arguments_max_bytes=1024)
    arguments = '{"path": "x.txt", "content": "' + "x" * 2000 + '"}'
    await refused(registry, "fs.write", arguments, match="TOOL_ARGUMENTS_MAX_BYTES")
    assert not (base / "x.txt").exists()


async def test_arguments_may_be_a_json_string(registry: ToolRegistry) -> None:
    outcome = await registry.execute("fs_read", '{"path": "notes.txt"}')
    assert outcome.ok and outcome.data["content"] == "alpha\nbeta\ngamma\n"


class _Echo(BaseModel):
    text: str = ""


async def test_a_failing_or_slow_tool_is_an_outcome_not_a_crash() -> None:
    async def bug(params: _Echo) -> Any:
        raise RuntimeError("kaboom")

    async def slow(params: _Echo) -> Any:
        await asyncio.sleep(10)

    registry = ToolRegistry([
        Tool(name="t.bug", description="", params=_Echo, run=bug, family="t"),
        Tool(name="t.slow", description="", params=_Echo, run=slow, family="t", timeout_s=0.05),
    ])
    outcome = await registry.execute("t.bug", {})
    assert outcome == ToolOutcome(ok=False, error="t.bug: failed: RuntimeError: kaboom",
                                  duration_ms=outcome.duration_ms)
    outcome = await registry.execute("t.slow", {})
    assert not outcome.ok and outcome.error == "t.slow: timed out after 0.05s"


def test_result_for_the_model_is_json_and_capped() -> None:
    assert ToolOutcome(ok=True, data={"a": 1}).for_model(100) == '{"ok": true, "data": {"a": 1}}'
    assert ToolOutcome(ok=False, error="no").for_model(100) == '{"ok": false, "error": "no"}'
    long = ToolOutcome(ok=True, data="x" * 1000).for_model(300)
    assert long.startswith('{"ok": true, "data": "xxx') and "[cut: " in long and len(long) < 340


# -- fs.read / fs.write ------------------------------------------------------------------------
async def test_read(registry: ToolRegistry) -> None:
    outcome = await registry.execute("fs.read", {"path": "notes.txt"})
    assert outcome.ok
    assert outcome.data == {"path": "notes.txt", "content": "alpha\nbeta\ngamma\n", "bytes": 17,
                            "truncated": False, "binary": False}
    inner = await registry.execute("fs.read", {"path": "./sub//inner.txt"})
    assert inner.ok and inner.data["path"] == "sub/inner.txt"
    # A link that stays inside the workspace is followed.
    linked = await registry.execute("fs.read", {"path": "link_in"})
    assert linked.ok and linked.data == {**inner.data, "path": "sub/inner.txt"}


async def test_read_caps_and_marks_truncated(base: Path) -> None:
    registry = registry_for(base, tool_output_max_bytes=256)
    (base / "big.txt").write_text("y" * 10_000)
    outcome = await registry.execute("fs.read", {"path": "big.txt"})
    assert outcome.ok
    assert outcome.data["content"] == "y" * 256
    assert outcome.data["truncated"] is True and outcome.data["bytes"] == 10_000


async def test_binary_files_read_as_replaced_text(registry: ToolRegistry, base: Path) -> None:
    (base / "blob.bin").write_bytes(b"\xff\xfe\x00\x01ok")
    outcome = await registry.execute("fs.read", {"path": "blob.bin"})
    assert outcome.ok
    assert outcome.data["content"] == "\ufffd\ufffd\x00\x01ok" and outcome.data["binary"] is True


async def test_a_fifo_is_refused_without_blocking(registry: ToolRegistry, base: Path) -> None:
    os.mkfifo(base / "pipe")
    async with asyncio.timeout(5):
        await refused(registry, "fs.read", {"path": "pipe"}, match="not a regular file")


async def test_write_creates_and_replaces(registry: ToolRegistry, base: Path) -> None:
    outcome = await registry.execute("fs.write", {"path": "new/deep/file.txt", "content": "héllo"})
    assert outcome.ok and outcome.data == {"path": "new/deep/file.txt", "bytes": 6, "created": True}
    assert (base / "new/deep/file.txt").read_text() == "héllo"
    outcome = await registry.execute("fs.write", {"path": "notes.txt", "content": "replaced"})
    assert outcome.ok and outcome.data["created"] is False
    assert (base / "notes.txt").read_text() == "replaced"
    assert not [name for name in snapshot(base) if name.endswith(".tmp")], "no temporary file left"


async def test_write_replaces_a_hard_link_instead_of_writing_through_it(
    registry: ToolRegistry, base: Path
) -> None:
    secret = base.parent / "outside" / "secret.txt"
    os.link(secret, base / "hard.txt")
    outcome = await registry.execute("fs.write", {"path": "hard.txt", "content": "overwritten"})
    assert outcome.ok
    assert (base / "hard.txt").read_text() == "overwritten"
    assert secret.read_text() == "top secret\n"


async def test_write_over_the_size_limit_is_refused(base: Path) -> None:
    registry = registry_for(base, fs_max_write_bytes=10)
    await refused(registry, "fs.write", {"path": "x.txt", "content": "x" * 11},
                  match="FS_MAX_WRITE_BYTES")
    assert not (base / "x.txt").exists()


BAD_PATHS = [
    ("../outside/secret.txt", "contains '..'"),
    ("sub/../../outside/secret.txt", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("~/secret.txt", "is absolute"),
    ("C:/Windows/win.ini", "is absolute"),
    ("%2e%2e/outside/secret.txt", "once percent-decoded"),
    ("%2E%2E%2Foutside%2Fsecret.txt", "once percent-decoded"),
    ("%252e%252e/outside/secret.txt", "once percent-decoded"),
    ("%2Fetc%2Fpasswd", "once percent-decoded"),
    ("..\\outside\\secret.txt", "backslash"),
    ("notes.txt\x00.png", "NUL byte"),
    ("notes%00.txt", "NUL byte"),
    ("a\nb.txt", "control character"),
    ("a\r.txt", "control character"),
    ("x" * 2000, "FS_MAX_PATH_CHARS"),
    ("sub/" + "n" * 300, "over 255 bytes"),
    ("", "path: String should have at least 1 character"),
    ("   ", "path is empty"),
    (".", "names the base folder itself"),
    ("link_out", "leads outside the base folder"),
    ("dir_out/secret.txt", "leads outside the base folder"),
    ("dangling_out", "leads outside the base folder"),
]


@pytest.mark.parametrize(("path", "match"), BAD_PATHS)
async def test_bad_paths_are_refused_for_reading(
    registry: ToolRegistry, base: Path, path: str, match: str
) -> None:
    before = snapshot(base.parent)
    await refused(registry, "fs.read", {"path": path}, match=match)
    assert snapshot(base.parent) == before


@pytest.mark.parametrize(("path", "match"), [
    *BAD_PATHS,
    (".git/config", "inside a .git folder"),
    ("sub/.GIT/hooks/pre-commit", "inside a .git folder"),
    ("sub", "is a folder"),
])
async def test_bad_paths_are_refused_for_writing(
    registry: ToolRegistry, base: Path, path: str, match: str
) -> None:
    before = snapshot(base.parent)
    await refused(registry, "fs.write", {"path": path, "content": "pwned"}, match=match)
    assert snapshot(base.parent) == before


def test_a_link_swapped_in_after_the_check_is_not_followed(base: Path) -> None:
    """The O_NOFOLLOW walk: a folder replaced by a link between check and open fails."""
    workspace = Workspace(base)
    parts = workspace.locate("sub/inner.txt")
    shutil.rmtree(base / "sub")
    (base / "sub").symlink_to(base.parent / "outside")
    with pytest.raises(ToolRefusal, match="symbolic link"):
        workspace.read(parts, limit=100)
    with pytest.raises(ToolRefusal, match="symbolic link"):
        workspace.write(parts, b"pwned")
    assert not (base.parent / "outside" / "inner.txt").exists()


# -- fs.apply_patch ----------------------------------------------------------------------------
PATCH_NOTES = """\
--- a/notes.txt
+++ b/notes.txt
@@ -1,3 +1,3 @@
 alpha
-beta
+BETA
 gamma
"""


async def test_apply_patch_modifies_creates_and_deletes(registry: ToolRegistry, base: Path) -> None:
    patch = PATCH_NOTES + """\
--- /dev/null
+++ b/sub/new.txt
@@ -0,0 +1,2 @@
+one
+two
--- a/sub/inner.txt
+++ /dev/null
@@ -1 +0,0 @@
-inner
"""
    outcome = await registry.execute("fs.apply_patch", {"patch": patch})
    assert outcome.ok, outcome.error
    assert outcome.data == {"files": [
        {"path": "notes.txt", "action": "modified", "hunks": 1},
        {"path": "sub/new.txt", "action": "created", "hunks": 1},
        {"path": "sub/inner.txt", "action": "deleted", "hunks": 1},
    ]}
    assert (base / "notes.txt").read_text() == "alpha\nBETA\ngamma\n"
    assert (base / "sub/new.txt").read_text() == "one\ntwo\n"
    assert not (base / "sub/inner.txt").exists()


async def test_apply_patch_finds_moved_context(registry: ToolRegistry, base: Path) -> None:
    (base / "notes.txt").write_text("zero\nzero2\nalpha\nbeta\ngamma\n")
    outcome = await registry.execute("fs.apply_patch", {"patch": PATCH_NOTES})
    assert outcome.ok, outcome.error
    assert (base / "notes.txt").read_text() == "zero\nzero2\nalpha\nBETA\ngamma\n"


async def test_apply_patch_handles_a_missing_final_newline(registry: ToolRegistry, base: Path) -> None:
    (base / "n.txt").write_text("a\nb")
    patch = "--- n.txt\n+++ n.txt\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n"
    outcome = await registry.execute("fs.apply_patch", {"patch": patch})
    assert outcome.ok, outcome.error
    assert (base / "n.txt").read_text() == "a\nc\n"


BAD_PATCHES = [
    ("--- a/../outside/secret.txt\n+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-top secret\n+pwned\n",
     "contains '..'"),
    ("--- /dev/null\n+++ /etc/cron.d/pwned\n@@ -0,0 +1 @@\n+pwned\n", "is absolute"),
    ("--- a/link_out\n+++ b/link_out\n@@ -1 +1 @@\n-top secret\n+pwned\n", "leads outside"),
    ("--- /dev/null\n+++ b/dir_out/new.txt\n@@ -0,0 +1 @@\n+pwned\n", "leads outside"),
    ("--- /dev/null\n+++ b/.git/config\n@@ -0,0 +1 @@\n+[core]\n", "inside a .git folder"),
    ("--- a/%2e%2e/outside/secret.txt\n+++ b/%2e%2e/outside/secret.txt\n@@ -1 +1 @@\n-top secret\n"
     "+pwned\n", "percent-decoded"),
    # The first file is fine, the second is not: neither is written.
    (PATCH_NOTES + "--- /dev/null\n+++ b/../outside/new.txt\n@@ -0,0 +1 @@\n+pwned\n", "contains '..'"),
    (PATCH_NOTES + "--- a/sub/inner.txt\n+++ b/sub/inner.txt\n@@ -1 +1 @@\n-not there\n+x\n",
     "does not apply"),
    ("--- a/notes.txt\n+++ b/other.txt\n@@ -1 +1 @@\n-alpha\n+x\n", "renames are not supported"),
    ("diff --git a/x.png b/x.png\nGIT binary patch\nliteral 0\n", "binary patches"),
    ("--- a/notes.txt\n+++ b/notes.txt\n@@ -1,3 +1,3 @@\n alpha\n-beta\n", "ends early"),
    ("--- a/notes.txt\n+++ b/notes.txt\n@@ -1 +1 @@\n*alpha\n", "unexpected line"),
    ("--- a/notes.txt\n+++ b/notes.txt\n@@ nonsense @@\n", "malformed hunk header"),
    ("just some text\n", "expected a '--- old' file header"),
    ('--- "a/no\\ttes.txt"\n+++ "b/no\\ttes.txt"\n@@ -1 +1 @@\n-a\n+b\n', "quoted file names"),
    ("--- /dev/null\n+++ b/notes.txt\n@@ -0,0 +1 @@\n+x\n", "already exists"),
    ("--- a/missing.txt\n+++ b/missing.txt\n@@ -1 +1 @@\n-a\n+b\n", "does not exist"),
    (PATCH_NOTES + PATCH_NOTES, "changes 'notes.txt' twice"),
]


@pytest.mark.parametrize(("patch", "match"), BAD_PATCHES)
async def test_bad_patches_are_refused_and_nothing_is_written(
    registry: ToolRegistry, base: Path, patch: str, match: str
) -> None:
    before = snapshot(base.parent)
    await refused(registry, "fs.apply_patch", {"patch": patch}, match=match)
    assert snapshot(base.parent) == before


def test_unidiff_insertions_and_crlf() -> None:
    [top] = parse_patch("--- f\n+++ f\n@@ -0,0 +1 @@\n+first\n")
    assert apply_hunks("a\nb\n", top.hunks, path="f") == "first\na\nb\n"
    [after] = parse_patch("--- f\n+++ f\n@@ -2,0 +3 @@\n+third\n")
    assert apply_hunks("a\nb\nc\n", after.hunks, path="f") == "a\nb\nthird\nc\n"
    [crlf] = parse_patch("--- f\n+++ f\n@@ -1 +1 @@\n-a\r\n+b\r\n")
    assert apply_hunks("a\r\nz\r\n", crlf.hunks, path="f") == "b\r\nz\r\n"
    with pytest.raises(PatchError, match="does not apply"):
        apply_hunks("A\r\n", crlf.hunks, path="f")


# -- git.status --------------------------------------------------------------------------------
def git(*args: str, cwd: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


@pytest.fixture
def repo(base: Path) -> Path:
    if not HAS_GIT:
        pytest.skip("git is not installed")
    root = base / "repo"
    root.mkdir()
    git("init", "-q", "-b", "main", cwd=root)
    (root / "tracked.txt").write_text("v1\n")
    git("add", "tracked.txt", cwd=root)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=root)
    (root / "tracked.txt").write_text("v2\n")
    (root / "untracked.txt").write_text("new\n")
    return root


async def test_git_status(registry: ToolRegistry, repo: Path) -> None:
    outcome = await registry.execute("git.status", {"path": "repo"})
    assert outcome.ok, outcome.error
    assert outcome.data == {
        "repository": "repo", "path": "repo", "branch": "main", "clean": False, "truncated": False,
        "entries": [{"status": " M", "path": "tracked.txt"}, {"status": "??", "path": "untracked.txt"}],
    }


async def test_git_status_refusals(registry: ToolRegistry, base: Path, repo: Path) -> None:
    outside = base.parent / "outside"
    await refused(registry, "git.status", {}, match="not inside a git repository")
    await refused(registry, "git.status", {"path": "../outside"}, match="contains '..'")
    await refused(registry, "git.status", {"path": "dir_out"}, match="leads outside")
    await refused(registry, "git.status", {"path": "notes.txt"}, match="is not a folder")
    # A .git *file* may point anywhere (gitdir: /elsewhere): refused.
    (base / "wt").mkdir()
    (base / "wt" / ".git").write_text(f"gitdir: {outside}\n")
    await refused(registry, "git.status", {"path": "wt"}, match="only plain repositories")


async def test_git_status_refuses_config_that_runs_programs(
    registry: ToolRegistry, repo: Path, spawned: list[tuple[str, ...]]
) -> None:
    canary = repo.parent.parent / "canary"
    with (repo / ".git" / "config").open("a") as config:
        config.write(f'[core]\n\tfsmonitor = "touch {canary}"\n')
    await refused(registry, "git.status", {"path": "repo"}, match="config that can run programs")
    assert not spawned and not canary.exists()


# -- terminal.exec -----------------------------------------------------------------------------
async def test_exec_runs_a_program(registry: ToolRegistry, spawned: list[tuple[str, ...]]) -> None:
    outcome = await registry.execute("terminal.exec", {"argv": ["echo", "hi", "there"]})
    assert outcome.ok, outcome.error
    assert outcome.data == {"argv": ["echo", "hi", "there"], "exit_code": 0, "stdout": "hi there\n",
                            "stderr": "", "truncated": False}
    assert spawned and spawned[0][0].endswith("/echo"), spawned
    listing = await registry.execute("terminal.exec", {"argv": ["ls", "-1", "sub"]})
    assert listing.ok and listing.data["stdout"] == "inner.txt\n"


async def test_exec_runs_in_the_workspace_with_a_clean_environment(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    registry = registry_for(base, terminal_allowlist=["pwd", "env"])
    here = await registry.execute("terminal.exec", {"argv": ["pwd"]})
    assert here.ok and here.data["stdout"] == registry.info["workspace"] + "\n"
    env = await registry.execute("terminal.exec", {"argv": ["env"]})
    assert env.ok
    assert "sk-must-not-leak" not in env.data["stdout"]
    assert sorted(line.split("=")[0] for line in env.data["stdout"].splitlines()) == sorted([
        "PATH", "HOME", "LANG", "LC_ALL", "TERM", "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_GLOBAL",
        "GIT_TERMINAL_PROMPT", "GIT_CEILING_DIRECTORIES"])


async def test_a_failing_command_reports_its_exit_code(registry: ToolRegistry) -> None:
    outcome = await registry.execute("terminal.exec", {"argv": ["ls", "missing"]})
    assert outcome.ok
    assert outcome.data["exit_code"] != 0 and "missing" in outcome.data["stderr"]


BAD_COMMANDS = [
    (["sh", "-c", "touch canary"], "not allowed"),
    (["bash"], "not allowed"),
    (["touch", "canary"], "not allowed"),
    (["/bin/echo", "hi"], "not a bare program name"),
    (["./echo"], "not a bare program name"),
    (["echo hi"], "not a bare program name"),
    (["echo hi; touch canary"], "shell syntax"),
    (["echo", "hi;", "touch", "canary"], "shell syntax"),
    (["echo", "$(touch canary)"], "shell syntax"),
    (["echo", "${IFS}"], "shell syntax"),
    (["echo", "`touch canary`"], "shell syntax"),
    (["echo", "a", "|", "tee", "canary"], "shell syntax"),
    (["echo", "x", ">canary"], "shell syntax"),
    (["echo", "x", "&&", "touch", "canary"], "shell syntax"),
    (["echo", "line\ntouch canary"], "control character"),
    (["echo", "a\rb"], "control character"),
    (["echo", "a\x00b"], "control character"),
    (["find", ".", "-exec", "touch", "canary", "+"], "find: '-exec' is not allowed"),
    (["find", ".", "-execdir", "touch", "canary", "+"], "is not allowed"),
    (["find", ".", "-delete"], "is not allowed"),
    (["find", ".", "-fprint", "canary"], "is not allowed"),
    (["find", "-L", "."], "is not allowed"),
    (["find", "../outside"], "contains '..'"),
    (["git", "--upload-pack=touch canary", "status"], "subcommands"),
    (["git", "-c", "core.pager=touch canary", "log"], "subcommands"),
    (["git", "-C", "/", "status"], "subcommands"),
    (["git", "config", "core.fsmonitor", "touch canary"], "subcommands"),
    (["git", "log", "--output=canary"], "option '--output=canary' is not allowed"),
    (["git", "log", "--upload-pack=touch canary"], "is not allowed"),
    (["git", "diff", "--ext-diff"], "is not allowed"),
    (["git", "log", "--format", "--output=canary"], "may not start with '-'"),
    (["git", "branch", "evil"], "takes no operands"),
    (["grep", "-f", "/etc/passwd", "x"], "option '-f' is not allowed"),
    (["grep", "x", "../outside/secret.txt"], "contains '..'"),
    (["grep", "-e", "x", "/etc/passwd"], "is absolute"),
    (["cat", "/etc/passwd"], "is absolute"),
    (["cat", "link_out"], "leads outside"),
    (["cat", "%2e%2e/outside/secret.txt"], "percent-decoded"),
    (["ls", "../"], "contains '..'"),
    (["tail", "-f", "notes.txt"], "option '-f' is not allowed"),
    (["head", "--help"], "is not allowed"),
    (["pwd", "extra"], "takes no operands"),
    (["sleep", "--version"], "takes no options"),
    (["rm", "-rf", "."], "not allowed"),
    (["echo", *["x"] * 100], "TERMINAL_MAX_ARGS"),
    (["echo", "x" * 5000], "TERMINAL_MAX_ARG_CHARS"),
]


@pytest.mark.parametrize(("argv", "match"), BAD_COMMANDS)
async def test_bad_commands_are_refused_and_nothing_runs(
    registry: ToolRegistry, base: Path, spawned: list[tuple[str, ...]], argv: list[str], match: str
) -> None:
    before = snapshot(base.parent)
    await refused(registry, "terminal.exec", {"argv": argv}, match=match)
    assert spawned == [], "no process may start"
    assert snapshot(base.parent) == before
    assert not (base / "canary").exists()


async def test_timeout_over_the_limit_is_refused(
    base: Path, spawned: list[tuple[str, ...]]
) -> None:
    registry = registry_for(base, terminal_max_timeout_s=5)
    await refused(registry, "terminal.exec", {"argv": ["sleep", "1"], "timeout_s": 6},
                  match="TERMINAL_MAX_TIMEOUT_S")
    assert spawned == []


async def test_a_slow_command_is_killed_at_its_timeout(registry: ToolRegistry) -> None:
    started = time.monotonic()
    await refused(registry, "terminal.exec", {"argv": ["sleep", "30"], "timeout_s": 0.3},
                  match="timed out after 0.3s; its process group was killed")
    assert time.monotonic() - started < 5


async def test_huge_output_is_capped_and_marked(base: Path) -> None:
    registry = registry_for(base, tool_output_max_bytes=1024)
    (base / "big.txt").write_bytes(b"z" * 5_000_000)
    outcome = await registry.execute("terminal.exec", {"argv": ["cat", "big.txt"]})
    assert outcome.ok
    assert outcome.data["stdout"] == "z" * 1024 and outcome.data["truncated"] is True


async def test_binary_output_is_decoded_with_replacements(registry: ToolRegistry, base: Path) -> None:
    (base / "blob.bin").write_bytes(b"\xff\xfe\x00ok\r\n\r\nevent: done\n")
    outcome = await registry.execute("terminal.exec", {"argv": ["cat", "blob.bin"]})
    assert outcome.ok
    assert outcome.data["stdout"] == "\ufffd\ufffd\x00ok\r\n\r\nevent: done\n"


# A program that starts a grandchild in its process group and records both pids.
_FAMILY = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill 0; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _wait_dead(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        await asyncio.sleep(0.05)


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    run = await run_process([sys.executable, "-c", _FAMILY, str(pids_file)], cwd=str(tmp_path),
                            env={"PATH": os.environ["PATH"]}, timeout_s=1.5, output_max_bytes=1024)
    assert run.timed_out
    await _wait_dead([int(pid) for pid in pids_file.read_text().split()])


async def test_cancelling_a_call_kills_its_process_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    task = asyncio.create_task(run_process(
        [sys.executable, "-c", _FAMILY, str(pids_file)], cwd=str(tmp_path),
        env={"PATH": os.environ["PATH"]}, timeout_s=60, output_max_bytes=1024))
    deadline = time.monotonic() + 10
    while not pids_file.exists() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_dead([int(pid) for pid in pids_file.read_text().split()])
