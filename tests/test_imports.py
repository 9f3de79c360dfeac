"""The import arrows run one way: recipes are plain data; fitnesses and zoos share models, not each other.

No module of evomerge imports itself back through others (no import cycle); an experiment is
configuration that imports nothing that runs it; workers never build a driver's plan.

Each check imports in a fresh interpreter and reads ``sys.modules`` (what the import really
loaded, transitively), and reads every module's source for imports inside functions too, which
run only when called. Imports under ``if TYPE_CHECKING:`` name types for annotations and never
run: they do not count.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
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


def _all_modules() -> list[str]:
    """Every module of the evomerge package, read from its files (packages by their own name)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def _run_time_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (its ``else`` runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"):
            for branch in node.orelse:
                yield branch
                yield from _run_time_nodes(branch)
            continue
        yield node
        yield from _run_time_nodes(node)


def _imported_names(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module``'s source (``from a import
    b`` names ``a.b`` too: b may be a module), but for annotations only."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    names = set()
    for node in _run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "evomerge":
            names.update(f"evomerge.{a.name}" for a in node.names)  # from evomerge import hub
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _import_graph() -> dict[str, set[str]]:
    """module -> the evomerge modules its source imports (a name that is not a module counts as
    the module it is imported from)."""
    modules = set(_all_modules())

    def module_of(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    return {m: {module_of(n) for n in _under(_imported_names(m), "evomerge")} - {m}
            for m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_through_others():
    graph = _import_graph()
    assert "evomerge.execution.driver" in graph["evomerge.api"]  # the graph sees inner imports
    assert _cycles(graph) == []


def test_experiments_are_configuration_that_imports_nothing_that_runs_them():
    ours = _imported_names("evomerge.experiment")
    assert _under(ours, "evomerge.execution") == [] and _under(ours, "evomerge.api") == []


def test_workers_derive_no_plan_and_import_no_driver():
    """A worker reads the experiment and the store's arguments from the study: it never builds
    a plan (models checked, space bound, strategy made) nor imports the driver."""
    graph = _import_graph()
    for module in ("evomerge.execution.worker", "evomerge.execution.evaluator"):
        reached, todo = set(), [module]
        while todo:  # everything the module imports, transitively
            for m in graph[todo.pop()] - reached:
                reached.add(m)
                todo.append(m)
        assert not reached & {"evomerge.execution.driver", "evomerge.execution.plan"}, module


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
