"""The `evomerge` command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evomerge import __version__
from evomerge.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "zoo" in result.output
    assert "--version" in result.output


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"evomerge {__version__}"


# ---- evomerge zoo ---------------------------------------------------------------------------


def test_zoo_build_help_documents_its_options():
    result = runner.invoke(app, ["zoo", "build", "--help"])
    assert result.exit_code == 0, result.output
    for text in ("toy", "--out", "--seed", "--size", "--force"):
        assert text in result.output


@pytest.mark.slow
def test_zoo_build_toy_tiny_builds_then_reuses(tmp_path):
    out = tmp_path / "toy"
    args = ["zoo", "build", "toy", "--size", "tiny", "--out", str(out), "--eval-items", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Built the toy zoo" in result.output
    for name in ("base", "expert_copy", "expert_reverse", "expert_sort"):
        assert name in result.output
        assert (out / name / "model.safetensors").is_file()
    for task in ("copy", "reverse", "sort"):
        assert task in result.output  # the loss table's columns
    manifest = json.loads((out / "zoo.json").read_text())
    assert (manifest["seed"], manifest["size"]) == (0, "tiny")

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "Reused the toy zoo" in again.output


def test_zoo_build_rejects_an_unknown_zoo(tmp_path):
    result = runner.invoke(app, ["zoo", "build", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert not any(tmp_path.iterdir())
