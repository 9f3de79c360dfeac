"""Reproductions of published experiments that are not merge searches, each with its own config
and run directory: :mod:`evomerge.reproductions.scratch` (M2N2 and separable CMA-ES evolving the
reference digits MLP from scratch). They use the library (strategies, store, report); the library
never imports them (only the CLI does, to send a ``setting:`` config here)."""
