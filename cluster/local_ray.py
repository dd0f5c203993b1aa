"""Everything a process of this project needs to talk to a local Ray cluster.

Ray 2.60 runs with token authentication (``RAY_AUTH_MODE=token``) and refuses
to start or connect without a token. A fresh machine has none, so this module
keeps a **project-local token file** (``.splitserve/ray_auth_token`` in the
checkout, created on first use, mode 0600, ignored by git) and points Ray at
it with ``RAY_AUTH_TOKEN_PATH``. A token the user already chose
(``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` in the environment) wins.

Every entry point that touches Ray (``make run``/``stop``, ``cluster.launch``,
``cluster.scale``, the benchmarks and the tests) calls :func:`apply_ray_env`
before it imports ``ray``, so a command pasted into a fresh shell works
without any variable set by hand. Child processes (``ray start``, ``ray job
submit``, Ray's own workers and jobs) inherit the same environment.

:func:`start_head` starts one head with ``ray start --head --block`` in its
own process group, its output in a log file; stopping it (SIGTERM to that
group) stops exactly this head, never another Ray cluster on the machine as
``ray stop`` would. When it fails to come up, the error carries the tail of
Ray's own output, not just an exit code.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".splitserve"  # project-local run state (git-ignored)
TOKEN_PATH = STATE_DIR / "ray_auth_token"
HEAD_START_TIMEOUT_S = 180.0
STATUS_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 30


class RayStartError(RuntimeError):
    """A Ray head (or a job) failed to start; the message holds Ray's own last words."""


def ensure_auth_token(path: Path = TOKEN_PATH) -> Path:
    """Create the token file at ``path`` if it does not exist; return its path."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes racing on a fresh checkout keep the first token.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def ray_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus what Ray needs here.

    - ``RAY_AUTH_MODE=token`` and a token (see the module docstring);
    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's single-node mode, which
      keeps every Ray process on 127.0.0.1 instead of the host's routable
      address (without it, ``ray.init(address=...)`` and ``ray start`` pick
      the machine's other interface).
    """
    env = dict(os.environ if base is None else base)
    env["RAY_AUTH_MODE"] = "token"
    if not env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH"):
        env["RAY_AUTH_TOKEN_PATH"] = str(ensure_auth_token())
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


def apply_ray_env() -> None:
    """Put :func:`ray_env` into ``os.environ``. Call before ``import ray``:
    Ray reads these when it is imported."""
    os.environ.update(ray_env())


def init_private_cluster(namespace: str, num_cpus: int = 2, *, tries: int = 1, **init_kwargs) -> None:
    """``ray.init`` a fresh local cluster owned by this process, on 127.0.0.1 only.

    ``address="local"``: a cluster of our own even when another head is up on
    the machine, and ``ray.shutdown()`` ends exactly it. Ray's single-node
    mode keeps ``_node_ip_address=127.0.0.1`` instead of the host's routable
    address; Ray reads it into a constant at import, so it is forced for this
    init only. ``tries``: Ray gives its raylet a fixed 30 s to start, which a
    loaded machine can miss.
    """
    apply_ray_env()
    import ray
    from ray._private import ray_constants

    single_node = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        for attempt in range(tries):
            try:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         namespace=namespace, log_to_driver=False, **init_kwargs)
                return
            except Exception:
                ray.shutdown()
                if attempt == tries - 1:
                    raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = single_node


def ray_bin() -> str:
    """The ``ray`` CLI of this interpreter's environment (not whatever is on PATH)."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class RayHead:
    """A head started by :func:`start_head` (or found again by its pid file)."""

    gcs_address: str
    dashboard_url: str
    log_path: Path
    pid: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment for a child process (``ray`` CLI, a job) that talks to this head."""
        return ray_env()

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.pid is None:
            return False
        return pid_running(self.pid)

    def stop(self, timeout_s: float = 60.0, grace_s: float = 10.0) -> None:
        """SIGTERM this head's process group (``ray start --block`` then stops the Ray processes it
        started), and SIGKILL the group once the leader has exited or ``grace_s`` has passed.

        Ray's own shutdown stops one kind of process after another, waiting on each: ~35 s on two cores,
        its GCS and autoscaler monitor last. Nothing of a head outlives it here (the deployment was
        drained before), so after the grace the rest is killed; ``timeout_s`` bounds the whole stop."""
        if not self.alive() or self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        self._wait_exit(time.monotonic() + min(grace_s, timeout_s))
        try:
            os.killpg(self.pid, signal.SIGKILL)  # what Ray's shutdown has not stopped yet
        except ProcessLookupError:
            pass
        self._wait_exit(deadline)

    def _wait_exit(self, deadline: float) -> None:
        while self.alive() and time.monotonic() < deadline:
            if self.process is not None:
                try:
                    self.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a head started by an earlier command is not
    our child, so its exit status may wait a while for whoever reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def head_answers(gcs_address: str, env: dict[str, str] | None = None) -> bool:
    """Whether a Ray head answers ``ray status`` at ``gcs_address``."""
    try:
        run = subprocess.run([ray_bin(), "status", "--address", gcs_address], capture_output=True,
                             timeout=STATUS_TIMEOUT_S, env=env or ray_env())
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


def dashboard_answers(dashboard_url: str) -> bool:
    """Whether the head's dashboard (the job server) answers HTTP at all yet."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=5).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answered (e.g. 401 without a token): it is up
    except OSError:
        return False


def start_head(num_cpus: int = 2, *, gcs_port: int | None = None, dashboard_port: int | None = None,
               log_path: Path | None = None, timeout_s: float = HEAD_START_TIMEOUT_S) -> RayHead:
    """Start a Ray head on 127.0.0.1 with ``num_cpus`` CPUs and the job server.

    Ports left ``None`` are picked free, and so is every other port the head
    opens: with Ray's fixed defaults a second head on the machine (a
    benchmark, another checkout) leaves this one without a dashboard agent,
    and ``ray job submit`` fails. Raises :class:`RayStartError` with the tail
    of Ray's output when the head exits or is not up within ``timeout_s``.
    """
    env = ray_env()
    gcs = gcs_port or free_port()
    dash = dashboard_port or free_port()
    agent, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(5))
    if log_path is None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        log_path = STATE_DIR / f"ray-head-{gcs}.log"
    cmd = [ray_bin(), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", "--disable-usage-stats"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", log_path, proc.pid, proc)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RayStartError(f"`ray start --head` exited with {proc.returncode}; its output "
                                f"({log_path}) ends:\n{tail(log_path)}")
        # `ray status` answers once the GCS is up; jobs need the dashboard too.
        if head_answers(head.gcs_address, env) and dashboard_answers(head.dashboard_url):
            return head
        if time.monotonic() > deadline:
            head.stop()
            raise RayStartError(f"Ray head not up after {timeout_s:.0f} s; its output ({log_path}) ends:\n"
                                f"{tail(log_path)}")
        time.sleep(1)
