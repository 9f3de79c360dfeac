"""Search spaces: a candidate (``x``, and for the weights kind its member) <-> a merge recipe.

One module per space kind, all bound one way (:mod:`evomerge.spaces.base`):

``ps``       :mod:`evomerge.spaces.ps`: merge-method parameters per layer / filter / source
             (Sakana's PS merge; the ``search_spaces/`` catalog);
``dfs``      :mod:`evomerge.spaces.dfs`: a path through the sources' layers with hop scales
             (Sakana's DFS merge; PS+DFS through its ``merged`` recipes);
``weights``  :mod:`evomerge.spaces.weights`: M2N2's crossover on the sources' flattened weights.

An experiment's space is read by :func:`parse_space` and bound by the definition's
``bind_to(BindTarget)``; the result answers the :class:`Bound` questions whatever its kind.
"""

from evomerge.spaces.base import (
    SPACE_KINDS,
    BindTarget,
    Bound,
    SpaceDefinition,
    SpaceError,
    parse_space,
    space_kind,
    strategy_options,
)
from evomerge.spaces.dfs import (
    LAYER_SCALES_LIMIT,
    SCALE_FORMS,
    BoundDfsSpace,
    DfsSpace,
    hop_matrix,
    scale_names,
)
from evomerge.spaces.ps import CATALOG_DIR, Axis, BoundSpace, SearchSpace, catalog, load_space
from evomerge.spaces.weights import BoundWeightSpace, WeightSpace, pairing_problems

__all__ = [
    "CATALOG_DIR",
    "LAYER_SCALES_LIMIT",
    "SCALE_FORMS",
    "SPACE_KINDS",
    "Axis",
    "BindTarget",
    "Bound",
    "BoundDfsSpace",
    "BoundSpace",
    "BoundWeightSpace",
    "DfsSpace",
    "SearchSpace",
    "SpaceDefinition",
    "SpaceError",
    "WeightSpace",
    "catalog",
    "hop_matrix",
    "load_space",
    "pairing_problems",
    "parse_space",
    "scale_names",
    "space_kind",
    "strategy_options",
]
