"""Tests that run against real services (PostgreSQL, Slurm, Ray): skip on a developer machine
that lacks one, fail in CI (``EVOMERGE_CI=1``, set by ``.ci/run``, which starts them all)."""

from __future__ import annotations

import os

import pytest


def require(available: bool, what: str) -> None:
    """Skip (developer machine) or fail (CI) when ``what`` is not available."""
    if available:
        return
    if os.environ.get("EVOMERGE_CI"):
        pytest.fail(f"{what} is required in CI (.ci/run starts it) but is not available")
    pytest.skip(f"{what} is not available here; .ci/run starts it")
