"""Fitness: score a merged model, returning objectives and the per-item scores behind them."""

from evomerge.fitness.base import FITNESSES, EvalResult, Fitness, Objective, make_fitness, register

__all__ = ["FITNESSES", "EvalResult", "Fitness", "Objective", "make_fitness", "register"]
