"""Session-wide test setup: the learning tiny-LM zoo, built once, and oracles required in CI.

The oracle libraries (mergekit, lm-eval) are pinned in the ``test`` extra; a test that compares
against one imports it with ``pytest.importorskip``, which skips on a developer machine without
it. In CI (``EVOMERGE_CI=1``, set by ``.ci/run``) a missing oracle must fail the test instead,
or a broken install would pass as a green run that checked nothing.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest


def _import_or_fail(modname: str) -> ModuleType:
    """``pytest.importorskip`` for CI: the module, or an ImportError that fails the test."""
    try:
        return importlib.import_module(modname)
    except ImportError as exc:
        raise ImportError(f"{modname} is required in CI (the test extra pins it): {exc}") from exc


def pytest_configure(config: pytest.Config) -> None:
    """In CI, ``pytest.importorskip`` (how every test imports an oracle) fails, never skips."""
    if os.environ.get("EVOMERGE_CI"):
        pytest.importorskip = _import_or_fail


@pytest.fixture(scope="session")
def learning_zoo(tmp_path_factory) -> Path:
    """The seed-0 ``mini`` tiny-LM zoo (about a minute, once per session): the test size whose
    experts master their tasks, so a test can assert that a merge beats its sources."""
    from evomerge.zoo.tinylm import build_tinylm_zoo

    root = tmp_path_factory.mktemp("tinylm-mini")
    build_tinylm_zoo(root, seed=0, size="mini", progress=False)
    return root
