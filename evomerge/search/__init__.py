"""Search strategies behind one ask/tell interface (see ``base.py``).

Importing this package registers the built-in strategies: ``cmaes`` (pycma), ``nsga2`` (pymoo),
``optuna`` (any Optuna sampler by name) and ``random``. Their heavy libraries are imported only
when a strategy is constructed.
"""

from evomerge.search.base import STRATEGIES, Candidate, Strategy, make_strategy, register
from evomerge.search.cmaes import CMAES
from evomerge.search.m2n2 import M2N2  # noqa: F401 - registers ``m2n2`` (natural niches)
from evomerge.search.map import MAPStrategy  # noqa: F401 - registers ``map`` (MAP)
from evomerge.search.nsga2 import NSGA2Strategy
from evomerge.search.optuna_sampler import OptunaStrategy
from evomerge.search.random_search import RandomSearch

__all__ = ["CMAES", "STRATEGIES", "Candidate", "NSGA2Strategy", "OptunaStrategy", "RandomSearch",
           "Strategy", "make_strategy", "register"]
