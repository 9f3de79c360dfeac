"""The `evomerge` command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from evomerge import __version__
from evomerge.cli import app
from evomerge.cli.zoo import ZooName

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def _commands(group=None, prefix: tuple[str, ...] = ()):
    """Every leaf command of the CLI (typer's click objects), by its argument path:
    ("zoo", "build"), ("run",), ..."""
    group = typer.main.get_command(app) if group is None else group
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "zoo" in result.output
    assert "--version" in result.output


def test_help_points_at_the_readme_quick_start():
    """The top-level help gives the README's quick start commands, not the toy zoo's merge."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    text = _help()
    for command in ("evomerge zoo build digits", "evomerge run experiments/digits_cmaes.yaml"):
        assert command in quick_start  # the README still says so
        assert command in text
    assert "evomerge dashboard runs/digits_cmaes" in text
    assert "toy_merge" not in text


# Where each command's output goes, as its help says it.
OUTPUT = {
    ("zoo", "build"): "OUT (default models/NAME) gets one Hugging Face directory per model",
    ("merge",): "OUT receives config, safetensors shards",
    ("run",): "the run directory receives summary.json, best_recipe.yaml",
    ("resume",): "best model and plots to RUN_DIR",
    ("dashboard",): "nothing is written to RUN_DIR",
    ("worker",): "each result is written to that study",
    ("slurm", "submit"): "Scripts, logs and job ids go to RUN_DIR/slurm/",
    ("irt", "validate"): "Prints the table; writes files only when asked",
}


def test_every_command_is_covered_here():
    assert {path for path, _ in _commands()} == set(OUTPUT)


@pytest.mark.parametrize("path", list(OUTPUT), ids=" ".join)
def test_every_command_help_says_what_it_does_its_defaults_and_its_output(path):
    command = dict(_commands())[path]
    text = _help(*path)
    assert len(command.help.split()) >= 15, "a few sentences on what the command does"
    assert OUTPUT[path] in text
    for param in command.params:
        if param.name == "help":
            continue
        assert getattr(param, "help", None), f"{' '.join(path)}: {param.name} has no help"
        if param.param_type_name == "option" and not param.required and not param.is_flag:
            shown = param.show_default and param.default is not None
            assert shown or "default" in param.help, (
                f"{' '.join(path)} {param.opts[0]}: no default shown or stated")


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"evomerge {__version__}"


def test_the_command_line_loads_no_model_library_until_a_command_needs_one():
    """``evomerge --help`` stays fast: torch, transformers and optuna load inside commands."""
    code = ("import sys, evomerge.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


# ---- evomerge zoo ---------------------------------------------------------------------------


def test_zoo_build_help_documents_its_options():
    result = runner.invoke(app, ["zoo", "build", "--help"])
    assert result.exit_code == 0, result.output
    for text in ("toy", "--out", "--seed", "--size", "--force"):
        assert text in result.output


def test_zoo_build_help_names_every_zoo_and_its_experts():
    text = _help("zoo", "build")
    experts = {"digits": ["expert_0_4", "expert_5_9"],
               "toy": ["expert_copy", "expert_reverse", "expert_sort"],
               "tiny-lm": ["expert_add", "expert_reverse", "expert_sort", "expert_translate"]}
    assert set(experts) == {z.value for z in ZooName}
    argument = text.split("Which zoo.", 1)[1].split("[required]", 1)[0]
    for zoo, names in experts.items():
        assert re.search(rf"(?<![\w-]){re.escape(zoo)}: ", argument), zoo
        for name in names:
            assert name in argument


def test_dashboard_help_states_its_security_defaults():
    text = _help("dashboard")
    for phrase in ("binds 127.0.0.1", "read-only", "--allow-writes", "Host header",
                   "localhost, 127.0.0.1 or [::1]", "Ctrl-C or SIGTERM stops it"):
        assert phrase in text, phrase


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
