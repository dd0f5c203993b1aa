"""Every command the README shows works when pasted into a fresh shell.

The commands are read from README.md itself (its ``bash`` blocks, in order),
so the README cannot drift from what works: each runs with ``bash -c`` in the
checkout, in an environment like a new terminal's on a fresh machine (a new
empty ``$HOME``, no ``RAY_*`` variable, no token). ``make test`` is the one
skipped: it is what runs this. Every ``python -m <module>`` the README
mentions in its prose must exist and answer ``--help``.

The bash blocks drive the real ``make run`` deployment on its documented
ports (Ray 6379/8265, router 50051, metrics 9464 and 9465); when something else holds
one of them the block test is skipped with the reason, never run against it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DEMO_PORTS = (6379, 8265, 50051, 9464, 9465, 8000)  # 9465: router replica 1's /metrics; 8000: HTTP
COMMAND_TIMEOUT_S = 900
SKIPPED = {"make test"}  # the command running this test


def readme_bash_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks: comments dropped, ``\\`` continuations joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).rstrip()  # "cmd    # what it does"
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            commands.append((pending + line.strip()).strip())
            pending = ""
    return commands


def readme_python_modules(text: str) -> set[str]:
    """Every ``python -m <module>`` the README mentions anywhere."""
    return set(re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)+)", text))


def fresh_shell_env(home: Path) -> dict[str, str]:
    """What a new terminal on a fresh machine has: no Ray settings, an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(home)
    return env


def port_taken(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readme_parsing_finds_the_setup_commands():
    commands = readme_bash_commands(README.read_text())
    assert commands[:2] == ["make run", "make test"], commands[:4]
    assert "make stop" in commands


def test_every_python_module_the_readme_mentions_answers_help(tmp_path):
    modules = sorted(readme_python_modules(README.read_text()))
    assert "router.client" in modules and "cluster.scale" in modules
    env = fresh_shell_env(tmp_path)
    failures = []
    for module in modules:
        run = subprocess.run([str(REPO / ".venv/bin/python"), "-m", module, "--help"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            failures.append(f"python -m {module} --help: exit {run.returncode}\n{run.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_readme_bash_blocks_work_in_a_fresh_shell(tmp_path):
    taken = [p for p in DEMO_PORTS if port_taken(p)]
    if taken:
        pytest.skip(f"ports {taken} are in use on this machine (a `make run` deployment is up?)")
    commands = [c for c in readme_bash_commands(README.read_text()) if c not in SKIPPED]
    env = fresh_shell_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    outputs: dict[str, str] = {}
    try:
        for command in commands:
            started = time.monotonic()
            run = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=COMMAND_TIMEOUT_S)
            out = run.stdout + run.stderr
            # Where the test's minutes go (shown with -s, or in the failure report).
            print(f"[{time.monotonic() - started:6.1f} s] {command}", file=sys.stderr)
            assert run.returncode == 0, f"`{command}` exited {run.returncode}:\n{out[-4000:]}"
            outputs[command] = out
    finally:
        subprocess.run(["bash", "-c", "make stop"], cwd=REPO, env=env, capture_output=True, timeout=600)
    assert "router SERVING on 127.0.0.1:50051" in outputs["make run"]
    assert outputs["make run"].count("TTFT") == 3  # three demo answers, each with its timings
    scale = next(out for cmd, out in outputs.items() if "cluster.scale" in cmd)
    assert "prefill=2 decode=2" in scale
    status = next(out for cmd, out in outputs.items() if "--status" in cmd)
    assert "decode" in status and "prefill" in status
    assert "stopped the Ray head" in outputs["make stop"]
    assert not any(port_taken(p) for p in (50051, 6379)), "make stop left the deployment or the head running"
