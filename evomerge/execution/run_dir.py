"""The study a run directory holds, for reading it back (``evomerge dashboard RUN_DIR``).

A merge search records its study where its experiment.yaml says (default sqlite
``RUN_DIR/study.db``); a from-scratch run keeps one journal per seed
(:func:`evomerge.reproductions.scratch.scratch_storage`).
"""

from __future__ import annotations

from pathlib import Path

import optuna

from evomerge.experiment import Experiment
from evomerge.store import open_storage, storage_url


def run_storage(run_dir: Path) -> tuple[optuna.storages.BaseStorage, str]:
    """The study of the run in ``run_dir`` and its URL: the directory given, even when the run
    was copied or moved there (a storage file inside the recorded run directory is looked up in
    ``run_dir``).

    Raises ExperimentError without a readable RUN_DIR/experiment.yaml, and FileNotFoundError
    when the storage file is missing, rather than opening a new, empty study.
    """
    recorded = Experiment.from_yaml(run_dir / "experiment.yaml")
    url = storage_url(recorded.storage, run_dir.absolute())
    prefix = next((p for p in ("sqlite:///", "journal://") if url.startswith(p)), None)
    if prefix is not None:
        path = Path(url.removeprefix(prefix)).absolute()
        try:
            path = run_dir.absolute() / path.relative_to(recorded.run_path)
        except ValueError:
            pass  # a store outside the recorded run directory stays where it is
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no study at {path} yet (has the run started?)")
        url = prefix + str(path)
    return open_storage(url), url
