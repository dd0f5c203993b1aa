"""One local Ray head for the whole test session (2 CPUs, 127.0.0.1).

Started with ``ray start --head --block`` rather than ``ray.init()`` so that
it also runs the job server that the ``ray job submit`` test needs, and so
that stopping it (SIGTERM to its process group) stops this head only, not
every Ray cluster on the machine as ``ray stop`` would. Token auth is on, as
Ray 2.60 expects.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def start_head(num_cpus: int = 2) -> RayHead:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (see tests/conftest.py)
    gcs, dash = free_port(), free_port()
    # Every port a head opens is picked free here: with Ray's fixed defaults a
    # second head on the machine (a benchmark, another checkout) leaves this
    # one without a dashboard agent, and `ray job submit` fails.
    agent, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(5))
    cmd = [ray_bin(), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        ok = subprocess.run([ray_bin(), "status", "--address", head.gcs_address], capture_output=True,
                            timeout=60, env=dict(os.environ)).returncode == 0
        if ok:
            return head
        if time.monotonic() > deadline:
            head.stop()
            raise TimeoutError(f"Ray head not up after {START_TIMEOUT_S:.0f} s")
        time.sleep(1)
