"""evomerge: evolutionary model-merge optimization."""

__version__ = "0.1.0"
