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


def test_worker_that_cannot_start_names_the_cause_and_leaks_no_actor(ray_head, tiny_model, tmp_path):
    import ray

    # A missing model is refused before any actor starts, naming the field.
    with pytest.raises(Exception) as err:
        with running(make_config(model="/nonexistent/model-dir")):
            pass
    assert "model.name" in str(err.value) and "/nonexistent/model-dir" in str(err.value), str(err.value)
    # A model whose config passes that check but whose weights are missing fails in the worker:
    # the error the user sees carries the worker's own cause.
    broken = tmp_path / "no-weights"
    broken.mkdir()
    tiny_model.config.to_json_file(str(broken / "config.json"))
    cfg = make_config(model=str(broken))
    with pytest.raises(Exception) as err:
        with running(cfg):
            pass
    message = str(err.value)
    # The worker's own cause (here: no tokenizer files beside the config) reached the user.
    assert "failed to start" in message and "tokenizer" in message, message
    # Named actors still alive in the deployment's namespace (through this driver's own connection).
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == cfg.ray.namespace]
    assert alive == [], alive
