"""Shared fixtures: each model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Ray 2.60 expects token authentication; Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def tiny_model():
    from engine.model_loader import TINY_MODEL, load_model

    return load_model(TINY_MODEL)


@pytest.fixture(scope="session")
def smollm2():
    from engine.model_loader import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
