"""The README's "Try it" block works pasted as one piece, and its sample output is the real
stream (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.ops_server import ROOT, clean_env
from tests.procs import free_port

#: Fields whose numbers differ from run to run; the sample shows one value.
VARYING_NUMBERS = ("duration_ms",)


def try_it() -> tuple[str, str]:
    """The "Try it" section's shell block and its sample output."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    fences = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)
    commands = next(body for lang, body in fences if lang == "bash")
    sample = next(body for lang, body in fences if lang == "")
    return commands, sample


def sample_pattern(sample: str) -> re.Pattern[str]:
    """A regex for the sample: a block that is only ``…`` stands for one or more frames,
    ``…`` in a line for any text in that line; the numbers of VARYING_NUMBERS are any
    whole number."""
    blocks = []
    for block in sample.strip().split("\n\n"):
        if block.strip() == "…":
            blocks.append(r"(?s:.+?)")
            continue
        pattern = "[^\n]*?".join(re.escape(part) for part in block.split("…"))
        for name in VARYING_NUMBERS:
            pattern = re.sub(rf'("{name}":)\d+', r"\1\\d+", pattern.replace('\\"', '"'))
        blocks.append(pattern)
    return re.compile("\n\n".join(blocks))


def test_the_sample_matcher_can_fail() -> None:
    pattern = sample_pattern('id: 1\ndata: {"a":…,"duration_ms":7}\n\n…\n\nid: 9')
    assert pattern.fullmatch('id: 1\ndata: {"a":x,"duration_ms":12}\n\nid: 2\n\nid: 3\n\nid: 9')
    assert not pattern.fullmatch('id: 1\ndata: {"a":x,"duration_ms":1.5}\n\nid: 2\n\nid: 9')
    assert not pattern.fullmatch('id: 1\ndata: {"a":x,"duration_ms":12}\n\nid: 9')  # … ≥ 1 frame


def test_try_it_pasted_as_one_piece_prints_the_sample(tmp_path: Path) -> None:
    commands, sample = try_it()
    # On a fresh clone the block installs and runs through make; here the venv exists (and
    # tests never run make), so those two become what they run, on a free port (PORT).
    assert commands.count("make install") == 1 and commands.count("make run") == 1
    assert "8080" in commands and "healthz" in commands
    port = free_port()
    script = (commands.replace("make install", "true")
              .replace("make run", f"{sys.executable} {ROOT / 'server.py'}")
              .replace("8080", str(port)))
    script += "\nstatus=$?\nkill $! && wait $!\nexit $status\n"  # stop the background server
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=clean_env(PORT=str(port)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + (tmp_path / "server.log").read_text()
    assert "serving on" in (tmp_path / "server.log").read_text()
    stream = done.stdout.strip()
    assert sample_pattern(sample).fullmatch(stream), (
        f"the README's sample does not match the real stream:\n{stream[:3000]}")
