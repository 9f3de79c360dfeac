"""Search strategies behind one ask/tell interface (see ``base.py``)."""

from evomerge.search.base import STRATEGIES, Candidate, Strategy, make_strategy, register

__all__ = ["STRATEGIES", "Candidate", "Strategy", "make_strategy", "register"]
