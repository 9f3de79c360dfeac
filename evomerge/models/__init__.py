"""Models and their data, shared by the zoos that train them and the fitnesses that score them.

Neither :mod:`evomerge.zoo` nor :mod:`evomerge.fitness` imports the other: what both need lives
here (:mod:`.digits`: the digits MLP and its splits; :mod:`.causal_lm`: batched scoring and greedy
generation with a causal LM).
"""
