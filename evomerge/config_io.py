"""Reading user configs (recipes, spaces, experiments): safe YAML and field-named errors.

Every config in evomerge is a pydantic model read from YAML; they share how a file is read
(``yaml.safe_load`` only) and how validation errors are worded: one line per problem, led by
the field in the config's own notation (``models[1].parameters.density: ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_yaml(path: str | Path, error: type[Exception], what: str) -> Any:
    """The parsed content of a YAML file, or ``error`` naming the file (missing, not YAML)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def field_path(loc: tuple) -> str:
    """pydantic's ``("models", 1, "model")`` as ``models[1].model``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def format_errors(exc: ValidationError,
                  line: Callable[[str, str], str] | None = None) -> str:
    """One indented line per problem; a validator's multi-line message gives several lines.

    ``line(field, message)`` may reword a line (e.g. to move a sub-field named in the message
    into the path); by default it is ``"field: message"``.
    """
    line = line or (lambda field, msg: f"{field}: {msg}" if field else msg)
    lines = []
    for err in exc.errors():
        field = field_path(err["loc"])
        for msg in err["msg"].removeprefix("Value error, ").split("\n"):
            lines.append("  " + line(field, msg))
    return "\n".join(lines)
