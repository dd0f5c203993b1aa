"""Shared fixtures: each model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Ray 2.60 expects token authentication; Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Keep every Ray process of the tests on 127.0.0.1: with this off, Ray uses
# loopback as the node address instead of the host's routable one. Child
# processes (ray start, Ray workers, jobs) inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def tiny_model():
    from engine.model_loader import TINY_MODEL, load_model

    return load_model(TINY_MODEL)


@pytest.fixture(scope="session")
def smollm2():
    from engine.model_loader import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
