"""Shared fixtures: each model is loaded once per test session."""

from __future__ import annotations

import pytest

from cluster.local_ray import apply_ray_env

# Token auth with the project-local token, loopback only: Ray reads these when
# it is imported, and every child process (ray start, workers, jobs) inherits them.
apply_ray_env()


@pytest.fixture(scope="session")
def tiny_model():
    from engine.model_loader import TINY_MODEL, load_model

    return load_model(TINY_MODEL)


@pytest.fixture(scope="session")
def smollm2():
    from engine.model_loader import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
