"""The one registry type: lazy ``module:object`` targets, decorator registration, entry-point
plugins, and errors that name the axis and what is known.

Import effects are checked in a fresh interpreter (``sys.modules`` after the lookup); the
plugin is a real installed distribution (a ``.dist-info`` with ``entry_points.txt``) on a
temporary ``sys.path`` entry, found by :mod:`importlib.metadata` as pip-installed ones are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evomerge.registry import Registry

BUILTIN_FITNESS_MODULES = {"digits": "evomerge.fitness.digits", "lm": "evomerge.fitness.lm",
                           "lm-eval": "evomerge.fitness.lmeval"}


def _run(code: str, *, path: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (``path`` first on its sys.path); the JSON it prints."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(BUILTIN_FITNESS_MODULES))
def test_looking_up_one_builtin_fitness_imports_only_its_module(name):
    loaded = _run(f"""
        import json, sys
        from evomerge.fitness.base import FITNESSES
        before = sorted(sys.modules)
        known = "{name}" in FITNESSES and sorted(FITNESSES)
        listed = sorted(sys.modules)
        cls = FITNESSES["{name}"]
        print(json.dumps({{"before": before, "listed": listed, "after": sorted(sys.modules),
                           "known": known, "module": cls.__module__}}))
    """)
    plugins = set(BUILTIN_FITNESS_MODULES.values()) | {"evomerge.fitness.perplexity"}
    assert not plugins & set(loaded["before"]), "fitness.base imported a plugin"
    assert not plugins & set(loaded["listed"]), "listing names imported a plugin"
    assert loaded["known"] == ["digits", "lm", "lm-eval", "perplexity"]
    assert loaded["module"] == BUILTIN_FITNESS_MODULES[name]
    assert plugins & set(loaded["after"]) == {BUILTIN_FITNESS_MODULES[name]}


def test_the_registry_module_imports_nothing_of_evomerge():
    loaded = _run("""
        import json, sys
        import evomerge.registry
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("evomerge"))))
    """)
    assert loaded == ["evomerge", "evomerge.registry"]


def test_a_decorated_class_is_registered_unchanged_and_found_by_name():
    registry: Registry[type] = Registry("strategy", "evomerge.tests.none")

    @registry.register("mine")
    class Mine:
        pass

    assert registry["mine"] is Mine
    assert "mine" in registry and list(registry) == ["mine"] and registry.names() == ["mine"]
    assert registry.items() == [("mine", Mine)]


def test_a_lazy_target_is_imported_on_first_lookup_only():
    registry: Registry[object] = Registry("sampler", "evomerge.tests.none",
                                          {"dumps": "json:dumps", "path": "os.path:join"})
    assert "dumps" in registry and len(registry) == 2  # names only: nothing resolved yet
    assert registry["dumps"] is json.dumps and registry["path"] is os.path.join


def test_an_unknown_name_is_refused_naming_the_axis_and_the_known_names():
    registry = Registry("strategy", "evomerge.tests.none", {"b": "json:dumps", "a": "json:loads"})
    with pytest.raises(KeyError) as info:
        registry["cmaess"]
    assert info.value.args[0] == "unknown strategy 'cmaess'; known: a, b"


def test_the_builtin_registries_name_their_axes_in_errors():
    from evomerge.execution import EXECUTORS
    from evomerge.fitness.base import FITNESSES
    from evomerge.fitness.irt import ESTIMATORS
    from evomerge.recipe import METHODS
    from evomerge.search import STRATEGIES
    from evomerge.search.optuna_sampler import SAMPLERS

    for registry, kind in ((METHODS, "merge method"), (STRATEGIES, "strategy"),
                           (FITNESSES, "fitness"), (EXECUTORS, "executor"),
                           (ESTIMATORS, "estimator"), (SAMPLERS, "sampler")):
        with pytest.raises(KeyError, match=f"^\"unknown {kind} 'nope'; known: "):
            registry["nope"]


def test_a_name_registered_twice_is_refused():
    registry = Registry("fitness", "evomerge.tests.none", {"digits": "json:dumps"})
    with pytest.raises(ValueError, match="fitness 'digits' is already registered"):
        registry.register("digits", "json:loads")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("digits")(object)
    assert registry["digits"] is json.dumps


def test_a_string_target_must_name_module_and_object():
    with pytest.raises(ValueError, match="must read 'module:object'"):
        Registry("executor", "evomerge.tests.none", {"local": "json.dumps"})


def test_the_merge_method_table_is_one_table_whose_kernels_load_on_use():
    from evomerge import recipe
    from evomerge.merge import methods

    assert methods.METHODS is recipe.METHODS
    assert methods.get_method("linear").fn is methods.linear_kernel
    assert methods.get_method("ties").fn.func is methods.gta_kernel


def _install_plugin(root: Path) -> Path:
    """A distribution ``fancy-plugin`` on ``root``: a good fitness and a broken one."""
    (root / "fancy_plugin.py").write_text("class Fancy:\n    pass\n")
    info = root / "fancy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[evomerge.fitnesses]\nfancy = fancy_plugin:Fancy\nbroken = no_such_module_xyz:Fitness\n")
    return root


def test_an_entry_point_plugin_is_listed_and_found_by_name_and_a_broken_one_is_named(tmp_path):
    found = _run("""
        import json
        from evomerge.fitness.base import FITNESSES
        names = FITNESSES.names()
        cls = FITNESSES["fancy"]
        try:
            FITNESSES["broken"]
            broken = None
        except ImportError as e:
            broken = str(e)
        print(json.dumps({"names": names, "fancy": f"{cls.__module__}:{cls.__name__}",
                          "broken": broken, "digits": FITNESSES["digits"].__name__}))
    """, path=_install_plugin(tmp_path))
    assert {"fancy", "broken", "digits", "lm"} <= set(found["names"])
    assert found["fancy"] == "fancy_plugin:Fancy"
    assert "fitness 'broken'" in found["broken"]
    assert "no_such_module_xyz:Fitness" in found["broken"]
    assert found["digits"] == "DigitsFitness"  # the others still load


def test_a_plugin_cannot_replace_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "x-0.1.dist-info").mkdir()
    (tmp_path / "x-0.1.dist-info" / "METADATA").write_text("Name: x\nVersion: 0.1\n")
    (tmp_path / "x-0.1.dist-info" / "entry_points.txt").write_text(
        "[evomerge.tests.shadow]\nlocal = json:loads\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("executor", "evomerge.tests.shadow", {"local": "json:dumps"})
    assert registry["local"] is json.dumps and list(registry) == ["local"]
