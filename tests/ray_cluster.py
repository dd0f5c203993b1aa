"""One local Ray head for the whole test session (2 CPUs, 127.0.0.1).

Started with ``ray start`` rather than ``ray.init()`` so that it also runs
the job server that the ``ray job submit`` test needs. Token auth is on, as
Ray 2.60 expects.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


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

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["RAY_AUTH_MODE"] = "token"
        return e


def start_head(num_cpus: int = 2) -> RayHead:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (see tests/conftest.py)
    gcs, dash = free_port(), free_port()
    cmd = [ray_bin(), "start", "--head", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180, env=dict(os.environ))
    return RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}")


def stop_head() -> None:
    subprocess.run([ray_bin(), "stop", "--force"], capture_output=True, timeout=120)
