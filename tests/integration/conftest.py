"""Fixtures for the integration tests: one Ray head per session, connected."""

from __future__ import annotations

import pytest

from cluster.local_ray import start_head


@pytest.fixture(scope="session")
def ray_head():
    import ray

    head = start_head(num_cpus=2)
    ray.init(address=head.gcs_address, logging_level="WARNING")
    yield head
    ray.shutdown()
    head.stop()
