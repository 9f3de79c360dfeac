"""``python -m evomerge.cli``: the ``evomerge`` command where the console script is not on PATH
(the SLURM job scripts run it so, with the job's Python)."""

from evomerge.cli import app

if __name__ == "__main__":
    app()
