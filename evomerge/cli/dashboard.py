"""``evomerge dashboard RUN_DIR``: optuna-dashboard for a run's study, read-only and local by
default (the guarded server is :mod:`evomerge.dashboard`)."""

from __future__ import annotations

from pathlib import Path

import typer

from evomerge.cli._common import console, fail

HELP = (
    "Serve optuna-dashboard for a run's study: trials, parameters, objectives, Pareto front, "
    "and the run's plots when RUN_DIR/artifacts holds them.\n\n"
    "Safe by default: the server binds 127.0.0.1 (this machine only), is [bold]read-only[/bold] "
    "(any request but GET/HEAD is refused with 405, so nobody can rename, delete or annotate "
    "studies through it; --allow-writes lifts that), and answers only requests whose Host header "
    "is localhost, 127.0.0.1 or \\[::1] with the port, plus --host and --allow-host (403 "
    "otherwise, which stops DNS-rebinding pages). Ctrl-C or SIGTERM stops it and frees the "
    "port.\n\n"
    "The study is the one in RUN_DIR (default sqlite RUN_DIR/study.db, else the experiment's "
    "storage); nothing is written to RUN_DIR. Open the printed URL in a browser."
)


def dashboard(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                   help="A run directory, e.g. runs/digits_cmaes."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Interface to bind; the default serves this machine only. "
                                  "Requests naming this host are accepted too."),
    port: int = typer.Option(8080, "--port", min=0, max=65535,
                             help="Port to listen on (0: any free port)."),
    allow_writes: bool = typer.Option(
        False, "--allow-writes",
        help="Let the dashboard change the study (notes, renames, deletes, tells). Off: every "
             "request but GET/HEAD gets 405."),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", show_default=False,
        help="Another Host header name to accept (repeatable), e.g. the machine's name when "
             "--host 0.0.0.0 \\[default: none]."),
    seed: int | None = typer.Option(None, "--seed", help="From-scratch runs: which seed's study "
                                    "\\[default: the first]."),
) -> None:
    """Serve optuna-dashboard for a run's study, read-only, on 127.0.0.1."""
    from evomerge import dashboard as board
    from evomerge.execution.run_dir import run_storage
    from evomerge.reproductions.scratch import scratch_config, scratch_storage
    from evomerge.experiment import ExperimentError

    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        fail(RuntimeError("optuna-dashboard is not installed: pip install optuna-dashboard"))
    scratch = scratch_config(run_dir / "experiment.yaml") is not None
    try:
        storage, where = scratch_storage(run_dir, seed) if scratch else run_storage(run_dir)
    except (ExperimentError, FileNotFoundError) as exc:
        fail(exc)
    except ValueError as exc:  # a --seed the run does not have
        fail(ValueError(f"--{exc}"))
    try:
        server = board.make_server(storage, host=host, port=port, allow_writes=allow_writes,
                                   allow_hosts=allow_host, artifact_dir=run_dir / board.ARTIFACTS)
    except OSError as exc:
        fail(OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                     "(another --port, or stop what holds it)"))
    bound = server.server_address[1]
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    console.print(f"optuna-dashboard for {where}, {mode}, on {board.url(host, bound)}",
                  soft_wrap=True)
    console.print("Ctrl-C stops it.")
    board.serve(server)

