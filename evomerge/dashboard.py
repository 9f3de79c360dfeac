"""``evomerge dashboard``: optuna-dashboard for one run, read-only and for this machine only.

optuna-dashboard's WSGI app answers every request it gets: its write endpoints (create, rename,
delete a study, notes, tell, artifact uploads) need no authentication, and it answers any
``Host`` header, so a web page the user visits can reach it through DNS rebinding. :class:`Guard`
wraps the app in two checks that run before it sees a request:

- **Host**: the ``Host`` header must name a host this server was meant to be reached by:
  ``localhost``, ``127.0.0.1`` or ``[::1]`` with the server's port, plus the bound host and any
  ``allow_hosts``. Anything else gets ``403 Forbidden``, so a rebound name never reaches the app.
- **Method**: only ``GET`` and ``HEAD`` unless ``allow_writes``; any other method gets
  ``405 Method Not Allowed`` (``Allow: GET, HEAD``). With writes allowed, a write whose
  ``Origin`` header names another site is refused too (cross-site requests from a browser).

:func:`make_server` serves the guarded app with :mod:`wsgiref` (what optuna-dashboard's own
``run_server`` uses) on 127.0.0.1 by default, one daemon thread per request, so stopping the
process (Ctrl-C, SIGTERM) stops the server and frees the port: :func:`serve` closes the socket on
the way out and no request thread outlives the process.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD"})
ARTIFACTS = "artifacts"  # RUN_DIR/artifacts: the run's plots as study artifacts, when present

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def host_name(host: str) -> str:
    """``host`` as it appears in a Host header: lower case, an IPv6 literal in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(port: int, host: str = "127.0.0.1", extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values the server answers: each name with ``:port`` (and bare, when the
    port is 80, which browsers leave out): loopback names, the bound ``host``, and ``extra``."""
    names = {*LOOPBACK_HOSTS, host_name(host), *map(host_name, extra)}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


class Guard:
    """WSGI middleware: refuse foreign Host headers (403) and, unless ``allow_writes``, every
    method but GET and HEAD (405), before ``app`` sees the request."""

    def __init__(self, app: WSGIApp, hosts: Iterable[str], *, allow_writes: bool = False) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.allow_writes = allow_writes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]):
        host = environ.get("HTTP_HOST", "").strip().lower()
        if host not in self.hosts:
            return _refuse(start_response, "403 Forbidden",
                           f"Host {host or '(none)'!r} is not served here: evomerge dashboard "
                           "answers loopback names (and --host / --allow-host) only.\n")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method in SAFE_METHODS:
            return self.app(environ, start_response)
        if not self.allow_writes:
            return _refuse(start_response, "405 Method Not Allowed",
                           f"{method} refused: this dashboard is read-only; restart it with "
                           "--allow-writes to rename, delete or annotate studies.\n",
                           [("Allow", ", ".join(sorted(SAFE_METHODS)))])
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and urlsplit(origin).netloc.lower() not in self.hosts:
            return _refuse(start_response, "403 Forbidden",
                           f"{method} from origin {origin!r} refused (cross-site request).\n")
        return self.app(environ, start_response)


def _refuse(start_response: Callable[..., Any], status: str, text: str,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def dashboard_app(storage: Any, artifact_dir: Path | None = None) -> WSGIApp:
    """optuna-dashboard's WSGI app for ``storage`` (an Optuna storage or URL), serving the study
    artifacts stored in ``artifact_dir`` (a FileSystemArtifactStore) when that directory exists."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    store = (FileSystemArtifactStore(str(artifact_dir))
             if artifact_dir is not None and Path(artifact_dir).is_dir() else None)
    return optuna_dashboard.wsgi(storage, artifact_store=store)


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one daemon thread per request: nothing keeps the process (and its port)
    alive once the main thread stops."""

    daemon_threads = True
    block_on_close = False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per request; errors still reach stderr through handle_error


def make_server(storage: Any, *, host: str = "127.0.0.1", port: int = 8080,
                allow_writes: bool = False, allow_hosts: Iterable[str] = (),
                artifact_dir: Path | None = None, quiet: bool = True) -> WSGIServer:
    """A bound (not yet serving) server of the guarded dashboard; ``port=0`` picks a free one.
    Raises OSError if the address cannot be bound."""
    app = dashboard_app(storage, artifact_dir)
    server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if (
        ":" in host) else _Server
    server = server_class((host.strip("[]"), port),
                          _QuietHandler if quiet else WSGIRequestHandler)
    bound = server.server_address[1]
    server.set_app(Guard(app, allowed_hosts(bound, host, allow_hosts), allow_writes=allow_writes))
    return server


def serve(server: WSGIServer) -> None:
    """Serve until the process is told to stop (Ctrl-C, SIGTERM), then close the socket."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def url(host: str, port: int) -> str:
    return f"http://{host_name(host)}:{port}/dashboard/"
