"""What each router replica is built from: its /metrics port and the settings the deployment derives."""

from __future__ import annotations

import dataclasses
import os

from cluster.config import load_config
from cluster.deployment import router_settings
from cluster.router_replica import router_actor_name


def test_replica_i_serves_metrics_on_metrics_port_plus_i():
    s = router_settings(load_config("router: {replicas: 3, metrics_port: 9464}"), token=None)
    assert [s.metrics_port_of(i) for i in range(3)] == [9464, 9465, 9466]

    def with_port(port):
        return dataclasses.replace(s, config=s.config.model_copy(update={"metrics_port": port}))

    assert with_port(0).metrics_port_of(2) == 0  # each picks a free port
    assert with_port(None).metrics_port_of(1) is None  # off


def test_settings_carry_absolute_tls_paths_and_the_router_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("router: {host: 0.0.0.0, port: 6000, auth_token_env: T, tls_cert: c.pem, tls_key: k.pem, "
                      "max_queued: 7}\nray: {namespace: ns}")
    s = router_settings(cfg, token="secret")
    # A replica's working directory is not the launch's: relative paths would not resolve there.
    assert s.tls == (os.path.join(tmp_path, "c.pem"), os.path.join(tmp_path, "k.pem"))
    assert (s.config.host, s.port, s.config.max_queued, s.token, s.namespace) == ("0.0.0.0", 6000, 7, "secret", "ns")
    assert s.config is cfg.router  # the section as written, not a copy of its fields
    assert not s.reuse_port  # set only for replicas, once the port is resolved
    assert router_actor_name(1) == "router-1"
