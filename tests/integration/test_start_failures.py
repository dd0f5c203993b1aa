"""A head, a job or a worker that fails to start says why (Ray's own last words), never just an exit code."""

from __future__ import annotations

import socket

import pytest

from benchmarks.deployments import make_config, running
from cluster.local_ray import RayStartError, start_head


def test_head_that_cannot_start_reports_rays_output(tmp_path):
    # Hold the GCS port: `ray start --head` must fail, and the error must carry what Ray printed.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RayStartError) as err:
            start_head(1, gcs_port=port, log_path=tmp_path / "head.log", timeout_s=120)
    message = str(err.value)
    assert "head.log" in message
    # The tail of Ray's output is in the message, not just "exited with 1".
    assert len(message.splitlines()) > 2, message


def test_worker_that_cannot_start_names_the_cause_and_leaks_no_actor(ray_head):
    import ray
    from ray.util.state import list_actors

    cfg = make_config(model="/nonexistent/model-dir")
    with pytest.raises(Exception) as err:
        with running(cfg):
            pass
    message = str(err.value)
    assert "failed to start" in message and "/nonexistent/model-dir" in message, message
    assert "nothing is downloaded" in message, message  # the loader's own explanation reached the user
    alive = [a for a in list_actors(filters=[("ray_namespace", "=", cfg.ray.namespace), ("state", "=", "ALIVE")],
                                    timeout=30)]
    assert alive == [], alive
    assert ray.is_initialized()
