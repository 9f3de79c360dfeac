"""The import arrows run one way: recipes are plain data; fitnesses and zoos share models, not each other.

Each check imports in a fresh interpreter and reads ``sys.modules`` (what the import really
loaded, transitively), and reads every module's source for imports inside functions too, which
run only when called.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import evomerge

PACKAGE = Path(evomerge.__file__).parent


def _loaded_after(*modules: str) -> set[str]:
    """Every module a fresh interpreter holds after importing ``modules``."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _modules_of(package: str) -> list[str]:
    path = PACKAGE / package.removeprefix("evomerge.").replace(".", "/")
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _imported_names(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module``'s source."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "evomerge":
            names.update(f"evomerge.{a.name}" for a in node.names)  # from evomerge import hub
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _under(names: set[str], package: str) -> list[str]:
    return sorted(n for n in names if n == package or n.startswith(package + "."))


def test_importing_recipes_loads_neither_torch_nor_the_merge_engine():
    loaded = _loaded_after("evomerge.recipe")
    assert "evomerge.recipe.params" in loaded  # the parameter table recipes validate against
    assert _under(loaded, "torch") == []
    assert _under(loaded, "evomerge.merge") == []


def test_recipe_modules_import_only_config_helpers_of_evomerge():
    for module in ["evomerge.recipe", *_modules_of("evomerge.recipe")]:
        ours = _under(_imported_names(module), "evomerge")
        assert all(n.startswith(("evomerge.recipe", "evomerge.config_io", "evomerge.hub",
                                 "evomerge.registry"))  # leaves: they import no evomerge
                   for n in ours), (module, ours)


@pytest.mark.parametrize(("package", "forbidden"), [("evomerge.fitness", "evomerge.zoo"),
                                                    ("evomerge.zoo", "evomerge.fitness")])
def test_fitnesses_and_zoos_do_not_import_each_other(package, forbidden):
    modules = _modules_of(package)
    assert modules
    for module in modules:
        assert _under(_imported_names(module), forbidden) == [], module
    assert _under(_loaded_after(*modules), forbidden) == []


def test_spaces_import_nothing_above_them():
    """Spaces sit below the driver: they decode candidates and imply strategy options, but
    never import the execution, the search strategies, the store or the CLI."""
    for module in ["evomerge.spaces", *_modules_of("evomerge.spaces")]:
        ours = _imported_names(module)
        for above in ("evomerge.execution", "evomerge.search", "evomerge.store", "evomerge.cli",
                      "evomerge.api"):
            assert _under(ours, above) == [], (module, above)


def test_only_the_cli_imports_the_reproductions():
    """The from-scratch runner is a separate package: the library never imports it."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        if module.startswith(("evomerge.cli", "evomerge.reproductions")):
            continue
        assert _under(_imported_names(module), "evomerge.reproductions") == [], module
