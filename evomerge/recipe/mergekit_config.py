"""MergeRecipe: a merge as plain, validated data, in mergekit's YAML merge-config format.

A recipe names a method, a base model, the source models, and parameters set globally or per
model. A parameter value (a *setting*) is mergekit's: a scalar; a list of numbers interpolated
across the layers ("gradient": layer i of L reads the list at t = i / (L - 1)); or a list of
``{filter, value}`` where the first filter that is a substring of the tensor name wins (``"*"`` or
no filter matches everything). Model-level settings take precedence over global ones. This is
how search spaces express per-layer-group (a gradient with one value per block) and per-filter
(``self_attn`` vs ``mlp``) parameters, and why a recipe found here runs unchanged in mergekit.

Recipes are frozen values: everything that crosses a process boundary is a recipe, never weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.config_io import format_errors, read_yaml
from evomerge.recipe.base import FlowListDumper, RecipeError
from evomerge.recipe.params import METHODS, MethodSpec, ParamSpec, get_spec, mergekit_comment

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    """``{filter: substring, value: setting}``: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]


class ModelEntry(BaseModel):
    """One input model and its own parameter settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None


DTYPES = ("float32", "float16", "bfloat16", "float64")


class MergeRecipe(BaseModel):
    """A mergekit-compatible merge config (the ``models:`` form).

    ``seed`` is evomerge's addition: it seeds DARE/DELLA masks per tensor so that the recipe
    reproduces the same model bit for bit. mergekit ignores the key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: tuple[ModelEntry, ...]
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0

    # ---- validation --------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
        problems = validate_recipe(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ---- structure ---------------------------------------------------------------------------

    @property
    def method(self) -> MethodSpec:
        """The parameter table of the recipe's merge method."""
        return get_spec(self.merge_method)

    def source_entries(self) -> list[ModelEntry]:
        """The inputs a method merges besides the base, in recipe order.

        For ``linear`` (base optional) a given base model is an ordinary weighted input,
        appended when not listed, as mergekit does.
        """
        entries = [e for e in self.models if self.method.base == "optional" or e.model != self.base_model]
        if self.method.base == "optional" and self.base_model and all(
            e.model != self.base_model for e in self.models
        ):
            entries.append(ModelEntry(model=self.base_model))
        return entries

    def model_paths(self) -> list[str]:
        """Every distinct model the recipe reads, base first."""
        paths = [self.base_model] if self.base_model else []
        for e in self.models:
            if e.model not in paths:
                paths.append(e.model)
        return paths

    def resolve(self, tensor_name: str, t: float = 0.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Parameter values for one tensor at layer position ``t``: (shared, one dict per source)."""
        spec = self.method
        shared = {
            p.name: _resolve_param(p, [self.parameters], tensor_name, t, "parameters")
            for p in spec.params if p.scope == "shared"
        }
        per_source = [
            {
                p.name: _resolve_param(p, [e.parameters, self.parameters], tensor_name, t, e.model)
                for p in spec.params if p.scope == "source"
            }
            for e in self.source_entries()
        ]
        return shared, per_source

    # ---- mergekit YAML -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "recipe",
                  check_models: bool = False) -> "MergeRecipe":
        """Validate a parsed mergekit config; one RecipeError naming every bad field.

        ``check_models``: when the recipe is invalid, the error also names each model
        reference that is neither a local directory (from the current directory) nor a
        resolvable Hub id, so a file with several mistakes is fixed in one go (a valid recipe's
        models are the loader's to check)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping with merge_method and models")
        for unsupported in ("slices", "modules"):
            if data.get(unsupported):
                raise RecipeError(
                    f"{where}: '{unsupported}:' (layer stacking) is not a weight merge; "
                    "passthrough slices are layer recipes (evomerge.recipe.layers, "
                    "`evomerge merge` reads them)"
                )
        data = {k: v for k, v in data.items() if k not in ("slices", "modules")}
        if "models" not in data and data.get("base_model"):
            raise RecipeError(f"{where}: 'models:' is missing")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            missing = _missing_models(data) if check_models else []
            lines = [format_errors(exc), *cls._other_problems(data, exc)]
            lines += [f"  {p}" for p in missing]
            raise RecipeError(f"{where}: invalid merge recipe:\n" + "\n".join(lines)) from None

    @classmethod
    def from_validated(cls, data: Mapping[str, Any]) -> "MergeRecipe":
        """The recipe :meth:`to_dict` wrote, rebuilt without validating it again.

        For data a validated recipe produced in this version of evomerge: the trials a driver
        stores, which its workers rebuild (validation is pydantic plus :func:`validate_recipe`,
        the larger part of reading a recipe). Anything a user wrote goes through
        :meth:`from_dict`, which names every bad field."""
        models = tuple(ModelEntry.model_construct(model=e["model"],
                                                  parameters=_settings(e.get("parameters")))
                       for e in data["models"])
        fields = {k: v for k, v in data.items() if k not in ("models", "parameters")}
        return cls.model_construct(**fields, models=models,
                                   parameters=_settings(data.get("parameters")))

    @classmethod
    def _other_problems(cls, data: Mapping[str, Any], exc: ValidationError) -> list[str]:
        """The recipe-level problems pydantic did not get to: a field error (an unknown
        top-level key, a seed that is not a number) stops it before :meth:`_check`. Validated
        again without the bad top-level fields, lines about those fields left out; errors inside
        ``models``/``parameters`` would change what the rest means, so then nothing is added."""
        locs = [e["loc"] for e in exc.errors()]
        if any(not loc or loc[0] in ("merge_method", "models", "parameters") for loc in locs):
            return []
        dropped = tuple(str(loc[0]) for loc in locs)
        try:
            cls.model_validate({k: v for k, v in data.items() if k not in dropped})
        except ValidationError as again:
            return [line for line in format_errors(again).split("\n")
                    if not line.strip().startswith(dropped)]
        return []

    @classmethod
    def from_yaml(cls, source: str | Path) -> "MergeRecipe":
        """Read a mergekit YAML config from a path or a YAML string (``yaml.safe_load``)."""
        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                        and source.endswith((".yaml", ".yml"))):
            return cls.from_dict(read_yaml(source, RecipeError, "recipe"), where=str(source),
                                 check_models=True)
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe: not valid YAML: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in mergekit's layout (defaults and empty fields omitted)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
            "merge_method": self.merge_method,
            "models": [e.model_dump(mode="json", exclude_none=True) for e in self.models],
        }

    def to_yaml(self) -> str:
        """mergekit YAML; comment lines first where mergekit would read it differently
        (:func:`evomerge.recipe.params.mergekit_comment`)."""
        comment = mergekit_comment(_scalars((self.parameters or {}).get("rescale", [])))
        return comment + yaml.dump(self.to_dict(), Dumper=FlowListDumper, sort_keys=False)

    def with_models(self, mapping: Mapping[str, str]) -> "MergeRecipe":
        """The same recipe with model references renamed (e.g. relative -> absolute paths)."""
        def rename(m: str | None) -> str | None:
            return mapping.get(m, m) if m is not None else None
        return self.model_copy(update={
            "base_model": rename(self.base_model),
            "models": tuple(e.model_copy(update={"model": rename(e.model)}) for e in self.models),
        })


def _settings(params: Mapping[str, Any] | None) -> dict[str, Setting] | None:
    """Plain parameter data as the validated types: ``{filter, value}`` mappings become
    :class:`Conditional` (what :func:`evaluate_setting` matches on), the rest stays."""
    return None if params is None else {k: _setting(v) for k, v in params.items()}


def _setting(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Conditional.model_construct(value=_setting(value["value"]),
                                           filter=value.get("filter"))
    if isinstance(value, list):
        return [_setting(v) for v in value]
    return value


# ---- setting evaluation (mergekit's evaluate_setting) ---------------------------------------


def evaluate_setting(setting: Setting | None, tensor_name: str, t: float,
                     convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """The value of a setting for one tensor, or None when no filter matches.

    Values pass through ``convert`` (the parameter's type) first, as mergekit validates them, so
    a YAML gradient of "1e-3" strings interpolates like numbers. Numeric lists interpolate
    linearly at ``t * (len - 1)``; lists of bools/strings pick ``values[int(t * (len - 1))]``;
    conditionals take the first matching filter.
    """
    if setting is None:
        return None
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return convert(setting)
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        values = [convert(v) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name, t, convert)
    return None


def _resolve_param(spec: ParamSpec, scopes: list[dict[str, Setting] | None], tensor_name: str,
                   t: float, owner: str) -> Any:
    for scope in scopes:
        if scope and spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor_name, t, spec.type)
            if value is not None:
                return value
    if spec.required:
        raise RecipeError(f"{owner}: parameter '{spec.name}' has no value for tensor {tensor_name}")
    return spec.default


# ---- validation ---------------------------------------------------------------------------


def _scalars(setting: Setting) -> list[Scalar]:
    """Every scalar a setting can produce (gradient ends, conditional values)."""
    if isinstance(setting, Conditional):
        return _scalars(setting.value)
    if isinstance(setting, list):
        return [s for item in setting for s in _scalars(item)]
    return [setting]


def _check_params(params: dict[str, Setting] | None, scope: str, where: str,
                  method: MethodSpec) -> list[str]:
    problems = []
    valid = [p.name for p in method.params if scope == "global" or p.scope == "source"]
    for name, setting in (params or {}).items():
        spec = method.param(name)
        if spec is None or name not in valid:
            problems.append(
                f"{where}.{name}: unknown parameter for {method.name}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
            continue
        for value in _scalars(setting):
            if spec.type is float and isinstance(value, str):
                value = _as_number(value)  # YAML 1.1 reads "1e-3" as a string; mergekit accepts it
            if spec.type is bool and not isinstance(value, bool):
                problems.append(f"{where}.{name}: expected true/false, got {value!r}")
            elif spec.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{where}.{name}: expected a number, got {value!r}")
            elif spec.type is float and not math.isfinite(value):
                problems.append(f"{where}.{name}: {value} is not a finite number")
            elif spec.type is float and (
                (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high)
            ):
                problems.append(f"{where}.{name}: {value} is outside [{spec.low}, {spec.high}]")
            elif spec.type not in (bool, float):  # a checker (ParamSpec.type)
                try:
                    spec.type(value)
                except ValueError as exc:
                    problems.append(f"{where}.{name}: {exc}")
    return problems


def validate_recipe(recipe: MergeRecipe) -> list[str]:
    """Every problem with a recipe, each naming its field; empty when the recipe is mergeable."""
    if recipe.merge_method not in METHODS:
        return [f"merge_method: unknown merge method {recipe.merge_method!r}; "
                f"known: {', '.join(sorted(METHODS))}"]
    method = recipe.method
    problems = []
    if not recipe.models:
        problems.append("models: at least one model is needed")
    if method.base == "required" and not recipe.base_model:
        problems.append(f"base_model: {method.name} needs a base model")
    for field, value in (("dtype", recipe.dtype), ("out_dtype", recipe.out_dtype)):
        if value is not None and value not in DTYPES:
            problems.append(f"{field}: {value!r} is not one of {', '.join(DTYPES)}")
    if recipe.tokenizer_source not in (None, "base"):
        problems.append("tokenizer_source: only 'base' is supported (tokenizer files are copied "
                        "from the base model)")
    inputs = len(recipe.model_paths()) if method.base != "ignored" else len(recipe.models)
    if inputs < method.min_inputs or (method.max_inputs is not None and inputs > method.max_inputs):
        bound = (f"exactly {method.min_inputs}" if method.max_inputs == method.min_inputs
                 else f"at least {method.min_inputs}")
        problems.append(f"models: {method.name} needs {bound} input models including the base, "
                        f"got {inputs}")
    problems += _check_params(recipe.parameters, "global", "parameters", method)
    for i, entry in enumerate(recipe.models):
        problems += _check_params(entry.parameters, "source", f"models[{i}].parameters", method)
    for spec in method.params:
        if spec.scope == "shared" and spec.required and spec.name not in (recipe.parameters or {}):
            problems.append(f"parameters.{spec.name}: required by {method.name}")
    required = [p.name for p in method.params if p.scope == "source" and p.required]
    for i, entry in enumerate(recipe.source_entries()):
        for name in required:
            if name not in (entry.parameters or {}) and name not in (recipe.parameters or {}):
                index = next((j for j, e in enumerate(recipe.models) if e.model == entry.model), None)
                where = f"models[{index}].parameters" if index is not None else "parameters"
                problems.append(f"{where}.{name}: required by {method.name} for model {entry.model}")
    return problems


def _missing_models(data: Mapping[str, Any]) -> list[str]:
    """``field: why`` for each model reference of a (raw, maybe invalid) recipe that is neither a
    local directory nor a resolvable Hub id, so that an invalid recipe's error names them too
    instead of leaving them to the next run (:func:`evomerge.hub.missing`)."""
    from evomerge import hub

    fields = [("base_model", data.get("base_model"))]
    models = data.get("models")
    if isinstance(models, (list, tuple)):
        fields += [(f"models[{i}].model", e.get("model")) for i, e in enumerate(models)
                   if isinstance(e, Mapping)]
    return hub.missing([(f, ref) for f, ref in fields if isinstance(ref, str) and ref])


def _as_number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
