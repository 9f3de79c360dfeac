"""The parameter table of every merge method: what a recipe may set, and where.

Plain data, torch-free, so that a recipe is validated wherever it is read (the driver, a CLI
check, a worker) without loading a tensor library. Each :class:`MethodSpec` names its tensor
kernel as a lazy ``"module:function"`` target (the built-ins' live in
:mod:`evomerge.merge.methods`), imported only when a merge runs: :data:`METHODS` is the one
table of merge methods, for recipes and the engine alike.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

from evomerge.registry import Registry, import_object

#: Sparsifiers of the generalized task arithmetic family (mergekit's names).
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
#: Sparsifiers whose masks are random draws: each entry has a keep probability p to divide by.
RANDOM_SPARSIFIERS = ("random", "della_magprune")

#: ``rescale`` rules, spelled as a recipe writes them (``true``/``false`` are l1/none).
RESCALE_MODES = ("l1", "inverse_p", "none")


def rescale_mode(value: bool | str) -> str:
    """The rule a ``rescale`` setting names: one of :data:`RESCALE_MODES`.

    * ``true`` or ``l1`` (mergekit 0.1.5, and since its Feb 2025 change): every kept entry times
      ``||delta||_1 / ||mask * delta||_1``, one factor per tensor and source;
    * ``inverse_p`` (the DARE paper; mergekit's ``rescale: true`` before that change; Sakana's
      evolutionary-merge recipes): every kept entry divided by its keep probability ``p``
      (``density`` for DARE, the entry's own ramp value for DELLA), so E[kept] = delta;
    * ``false`` or ``none``: kept entries unchanged.
    """
    if value is True or value == "l1":
        return "l1"
    if value is False or value == "none":
        return "none"
    if value == "inverse_p":
        return "inverse_p"
    raise ValueError(f"expected true/false or one of {', '.join(RESCALE_MODES)}, got {value!r}")


def _rescale_setting(sparsify: str | None) -> Callable[[Any], bool | str]:
    """The ``rescale`` parameter's type for one method: checks a value (``inverse_p`` needs
    a random mask) and returns it as written, so recipes keep their spelling."""

    def rescale(value: Any) -> bool | str:
        if rescale_mode(value) == "inverse_p" and sparsify not in RANDOM_SPARSIFIERS:
            raise ValueError("inverse_p divides kept entries by their keep probability, which "
                             "only random masks have (dare_linear, dare_ties, della, "
                             "della_linear); use true (L1 norm) or false")
        return value

    return rescale


def mergekit_comment(rescale: Sequence[bool | str]) -> str:
    """YAML comment lines (empty: none) telling a mergekit user how a recipe whose ``rescale``
    takes these values reads there: mergekit 0.1.5 takes ``rescale`` as a boolean only and
    always matches the L1 norm."""
    notes = []
    if "inverse_p" in rescale:
        notes.append("rescale: inverse_p divides each kept entry by its keep probability (DARE's "
                     "1/p; della: the entry's own p), as mergekit's rescale: true did before its "
                     "Feb 2025 change; mergekit since then (0.1.5 checked) matches the L1 norm "
                     "instead and refuses this value (true there means L1).")
    if "l1" in rescale or "none" in rescale:
        notes.append("rescale: mergekit 0.1.5 reads only true/false here: l1 is true, none is "
                     "false.")
    return "".join(f"# {line}\n" for n in notes for line in textwrap.wrap(n, 96))


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter: scope ``shared`` (one value) or ``source`` (one per non-base input)."""

    name: str
    #: bool, float, or a checker that returns a valid value as given and raises ValueError
    #: naming what is accepted (``rescale``)
    type: type | Callable[[Any], Any]
    scope: str  # "shared" | "source"
    default: Any = None  # None: required
    low: float | None = None
    high: float | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: what a recipe of it may say (its parameters, its contract on inputs)
    and the kernel that merges a tensor.

    ``base`` is "required", "optional" (linear: an extra weighted input) or "ignored"; counts
    include the base when it is an input. ``kernel`` is the ``"module:function"`` of
    ``fn(inputs, shared, per_source, out) -> Tensor``, called with ``kernel_options`` as
    keywords; it is imported on first use of :attr:`fn`, so the table stays torch-free.
    """

    name: str
    params: tuple[ParamSpec, ...]
    base: str = "required"
    min_inputs: int = 1
    max_inputs: int | None = None
    reference: str = ""
    kernel: str = field(kw_only=True)
    kernel_options: tuple[tuple[str, Any], ...] = field(default=(), kw_only=True)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @cached_property
    def fn(self) -> Callable[..., Any]:
        """The tensor kernel, ``kernel`` imported with ``kernel_options`` bound."""
        kernel = import_object(self.kernel)
        return partial(kernel, **dict(self.kernel_options)) if self.kernel_options else kernel


def get_spec(name: str) -> MethodSpec:
    """The registered method ``name`` (KeyError listing the known names)."""
    return METHODS[name]


#: where the built-in kernels live (imported when a merge runs, never by the table)
_KERNELS = "evomerge.merge.methods"
_WEIGHT = ParamSpec("weight", float, "source", doc="scale of this model's task vector")
_DENSITY = ParamSpec("density", float, "source", 1.0, 0.0, 1.0, "fraction of the task vector kept")
_GAMMA = ParamSpec("gamma", float, "source", 0.01, 0.0, 1.0, "fraction of largest |delta| dropped")
_EPSILON = ParamSpec("epsilon", float, "source", 0.15, 0.0, 1.0, "half-width of DELLA's ramp")
_LAMBDA = ParamSpec("lambda", float, "shared", 1.0, doc="scale of the merged task vector")
# Accepted for mergekit compatibility; it only shrinks mergekit's stacked sign masks, which the
# streamed sign election here never materialises.
_INT8 = ParamSpec("int8_mask", bool, "shared", False, doc="mergekit memory option (no effect)")


@dataclass(frozen=True)
class GTA:
    """How one generalized-task-arithmetic method treats its task vectors (mergekit's
    ``GeneralizedTaskArithmeticMerge`` options): the kernel reads these, the table below the
    parameters they imply."""

    name: str
    sparsify: str | None
    consensus: bool
    normalize: bool
    rescale: bool
    reference: str

    @property
    def spec(self) -> MethodSpec:
        how = ("true/l1: restore the L1 norm after masking; inverse_p: divide kept entries by "
               "their keep probability; false/none" if self.sparsify in RANDOM_SPARSIFIERS else
               "true/l1: restore the L1 norm after masking; false/none")
        params = [_INT8,
                  ParamSpec("normalize", bool, "shared", self.normalize,
                            doc="divide by sum of weights"),
                  ParamSpec("rescale", _rescale_setting(self.sparsify), "shared", self.rescale,
                            doc=how),
                  _LAMBDA, _WEIGHT, _DENSITY]
        if self.sparsify == "magnitude_outliers":
            params.append(_GAMMA)
        if self.sparsify == "della_magprune":
            params.append(_EPSILON)
        return MethodSpec(self.name, tuple(params), base="required", min_inputs=1,
                          reference=self.reference, kernel=f"{_KERNELS}:gta_kernel",
                          kernel_options=(("sparsify", self.sparsify),
                                          ("consensus", self.consensus)))


#: the generalized task arithmetic family, in mergekit's configuration
GTA_METHODS: tuple[GTA, ...] = (
    GTA("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    GTA("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    GTA("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    GTA("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    GTA("breadcrumbs", "magnitude_outliers", False, False, False,
        "https://arxiv.org/abs/2312.06795"),
    GTA("breadcrumbs_ties", "magnitude_outliers", True, False, False,
        "https://arxiv.org/abs/2312.06795"),
    GTA("della", "della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    GTA("della_linear", "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
)

#: merge_method -> its :class:`MethodSpec`; plugins: entry-point group ``evomerge.methods`` (a
#: MethodSpec whose ``kernel`` names the plugin's function).
METHODS: Registry[MethodSpec] = Registry("merge method", "evomerge.methods", {s.name: s for s in (
    *(g.spec for g in GTA_METHODS),
    MethodSpec("linear",
               (ParamSpec("weight", float, "source", doc="this model's share"),
                ParamSpec("normalize", bool, "shared", True, doc="divide by sum of weights")),
               base="optional", min_inputs=1, reference="https://arxiv.org/abs/2203.05482",
               kernel=f"{_KERNELS}:linear_kernel"),
    MethodSpec("slerp",
               (ParamSpec("t", float, "shared", None, 0.0, 1.0, "0 = base, 1 = the other model"),),
               base="required", min_inputs=2, max_inputs=2,
               reference="https://en.wikipedia.org/wiki/Slerp", kernel=f"{_KERNELS}:slerp_kernel"),
    MethodSpec("model_stock",
               (ParamSpec("filter_wise", bool, "shared", False,
                          doc="one interpolation ratio per row"),),
               base="required", min_inputs=3, reference="https://arxiv.org/abs/2403.19522",
               kernel=f"{_KERNELS}:model_stock_kernel"),
)})
