"""``evomerge dashboard RUN_DIR`` serves optuna-dashboard for the run's study: on 127.0.0.1 by
default (DESIGN decision 8), read-only unless ``--allow-writes``, answering loopback Host headers
only (DNS rebinding), and gone with its process. Every check is real HTTP against a real server:
an in-process one on a small study for the method and Host rules, the ``evomerge`` process on a
finished run for the command, its stop, and the trial page as headless Chromium renders it."""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import psutil
import pytest
from run_helpers import build_zoo, cli, experiment_data, free_port, run_in_process, start
from services import require
from typer.testing import CliRunner

from evomerge import dashboard as board
from evomerge.cli import app

BUDGET = 8
READ_ONLY = b"read-only"  # in the guard's 405 body, never in optuna-dashboard's own answers


# ---- an in-process server on a small study -----------------------------------------------------


@pytest.fixture
def study_url(tmp_path) -> str:
    """A SQLite study "probe" with three complete trials, named parameters and metric names."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="probe", direction="maximize")
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["acc"])
    for value in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(
            params={"expert_a.weight": value}, values=[value],
            distributions={"expert_a.weight": optuna.distributions.FloatDistribution(0, 1)}))
    return url


@contextmanager
def serving(storage, **options) -> Iterator[int]:
    """The guarded dashboard served in a thread of this process on a free port; the port."""
    server = board.make_server(storage, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def request(port: int, method: str, path: str, *, host: str | None = None,
            body: object = None, headers: dict[str, str] | None = None,
            address: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the Host header ``host`` (default ``127.0.0.1:port``)."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    sent = {"Host": host if host is not None else f"127.0.0.1:{port}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _has_note(study: optuna.Study) -> bool:
    """Whether optuna-dashboard saved a study note (system attributes ``dashboard:note_*``;
    trial notes are ``dashboard:<trial id>:note_*``)."""
    return any(key.startswith("dashboard:note")
               for key in study._storage.get_study_system_attrs(study._study_id))


def studies(port: int) -> list[dict]:
    status, _, body = request(port, "GET", "/api/studies")
    assert status == 200, body
    return json.loads(body)["study_summaries"]


# Every write optuna-dashboard offers a browser, with a body it accepts (PATCH: no such route).
WRITES = [
    ("POST", "/api/studies", {"study_name": "created", "directions": ["minimize"]}),
    ("POST", "/api/studies/1/rename", {"study_name": "renamed"}),
    ("PUT", "/api/studies/1/note", {"version": 1, "body": "written through the dashboard"}),
    ("PATCH", "/api/studies/1", {"study_name": "patched"}),
    ("DELETE", "/api/studies/1", {}),
]


def test_get_and_head_are_served(study_url):
    with serving(study_url) as port:
        assert [s["study_name"] for s in studies(port)] == ["probe"]
        status, _, body = request(port, "GET", "/api/studies/1")
        assert status == 200
        detail = json.loads(body)
        assert detail["objective_names"] == ["acc"]
        assert len(detail["trials"]) == 3
        status, headers, page = request(port, "GET", "/dashboard/")
        assert status == 200 and b"<html" in page.lower()
        assert "Content-Security-Policy" in headers  # optuna-dashboard's own header survives
        status, _, empty = request(port, "HEAD", "/dashboard/")
        assert (status, empty) == (200, b"")


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[w[0] + w[1] for w in WRITES])
def test_writes_are_refused_by_default(study_url, method, path, body):
    with serving(study_url) as port:
        status, headers, text = request(port, method, path, body=body)
        assert status == 405, text
        assert headers["Allow"] == "GET, HEAD"
        assert READ_ONLY in text and b"--allow-writes" in text
        assert [s["study_name"] for s in studies(port)] == ["probe"]
    study = optuna.load_study(study_name="probe", storage=study_url)
    assert len(study.trials) == 3
    assert not _has_note(study)


def test_writes_pass_with_allow_writes(study_url):
    with serving(study_url, allow_writes=True) as port:
        results = {method + path: request(port, method, path, body=body)
                   for method, path, body in WRITES[:2]}  # create, rename study 1
        assert [r[0] for r in results.values()] == [201, 201], results
        names = {s["study_name"]: s["study_id"] for s in studies(port)}
        assert set(names) == {"created", "renamed"}  # rename: a new study, the old one deleted
        renamed = names["renamed"]
        status, _, body = request(port, "PUT", f"/api/studies/{renamed}/note",
                                  body={"version": 1, "body": "a note"})
        assert status == 204, body
        status, _, body = request(port, "GET", f"/api/studies/{renamed}")
        assert json.loads(body)["note"]["body"] == "a note"
        status, _, text = request(port, "PATCH", f"/api/studies/{renamed}", body={})
        assert READ_ONLY not in text  # past the guard; optuna-dashboard has no PATCH route
        status, _, _ = request(port, "DELETE", f"/api/studies/{renamed}", body={})
        assert status == 204
        assert [s["study_name"] for s in studies(port)] == ["created"]


def test_a_cross_site_write_is_refused_even_with_allow_writes(study_url):
    with serving(study_url, allow_writes=True) as port:
        status, _, text = request(port, "DELETE", "/api/studies/1", body={},
                                  headers={"Origin": "http://evil.example"})
        assert status == 403, text
        assert [s["study_name"] for s in studies(port)] == ["probe"]
        status, _, _ = request(port, "DELETE", "/api/studies/1", body={},
                               headers={"Origin": f"http://localhost:{port}"})
        assert status == 204
        assert studies(port) == []


@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1:1",
                                  "localhost.evil.example:{port}", "0.0.0.0:{port}", ""])
def test_a_foreign_host_header_is_refused(study_url, host):
    with serving(study_url) as port:
        status, _, text = request(port, "GET", "/api/studies", host=host.format(port=port))
        assert status == 403, text
        assert b"probe" not in text and b"not served here" in text


def test_a_request_without_a_host_header_is_refused(study_url):
    with serving(study_url) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", "/api/studies", skip_host=True)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 403
        conn.close()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}",
                                  "LocalHost:{port}"])
def test_loopback_host_headers_are_accepted(study_url, host):
    with serving(study_url) as port:
        status, _, body = request(port, "GET", "/api/studies", host=host.format(port=port))
        assert status == 200 and b"probe" in body


def test_the_bound_host_and_allow_host_names_are_accepted(study_url):
    """``--host 127.0.0.2`` (any 127/8 address is this machine on Linux) accepts Host headers
    naming it, ``--allow-host`` adds a name; others stay refused."""
    with serving(study_url, host="127.0.0.2", allow_hosts=["mybox.lan"]) as port:
        for host in (f"127.0.0.2:{port}", f"mybox.lan:{port}", f"localhost:{port}"):
            status, _, _ = request(port, "GET", "/api/studies", host=host, address="127.0.0.2")
            assert status == 200, host
        status, _, _ = request(port, "GET", "/api/studies", host=f"otherbox.lan:{port}",
                               address="127.0.0.2")
        assert status == 403


def test_allowed_hosts_spelling():
    assert board.allowed_hosts(8080) == {"localhost:8080", "127.0.0.1:8080", "[::1]:8080"}
    assert "[::]:8080" in board.allowed_hosts(8080, "::")
    assert {"localhost", "localhost:80"} <= board.allowed_hosts(80)  # browsers omit :80
    assert board.url("::1", 9000) == "http://[::1]:9000/dashboard/"


def test_run_artifacts_are_served_when_the_run_has_them(study_url, tmp_path):
    """RUN_DIR/artifacts is served as the study's artifact store (the run's plots)."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir = tmp_path / board.ARTIFACTS
    store_dir.mkdir()
    plot = tmp_path / "convergence.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n not really a plot")
    study = optuna.load_study(study_name="probe", storage=study_url)
    artifact_id = upload_artifact(study_or_trial=study, file_path=str(plot),
                                  artifact_store=FileSystemArtifactStore(str(store_dir)))
    with serving(study_url, artifact_dir=store_dir) as port:
        status, _, body = request(port, "GET", "/api/meta")
        assert json.loads(body)["artifact_is_available"] is True
        status, _, body = request(port, "GET", "/api/studies/1")
        assert [a["filename"] for a in json.loads(body)["artifacts"]] == ["convergence.png"]
        status, _, body = request(port, "GET", f"/artifacts/1/{artifact_id}")
        assert (status, body) == (200, plot.read_bytes())
    with serving(study_url, artifact_dir=tmp_path / "missing") as port:
        status, _, body = request(port, "GET", "/api/meta")
        assert json.loads(body)["artifact_is_available"] is False


# ---- the command on a finished run -------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    zoo = build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")
    run_dir = tmp_path_factory.mktemp("dashboard") / "run"
    run_in_process(experiment_data("cmaes", zoo, run_dir, budget=BUDGET))
    return run_dir


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


@contextmanager
def dashboard_process(run_dir: Path, log: Path, *args: object) -> Iterator[tuple[object, int]]:
    """``evomerge dashboard RUN_DIR`` in its own process, answering; (process, port)."""
    port = free_port()
    proc = start(cli("dashboard", run_dir, "--port", port, *args), log)
    try:
        deadline, status = time.monotonic() + 60, None
        while status != 200:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "no answer on /dashboard/ within 60 s:\n" + (
                log.read_text(errors="replace"))
            try:
                status, _, _ = request(port, "GET", "/dashboard/")
            except OSError:
                time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` and a new server can take it (SO_REUSEADDR, as wsgiref's
    does: the closed connections' TIME_WAIT entries do not hold a port against it)."""
    if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
           for c in psutil.net_connections(kind="inet")):
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_dashboard_serves_the_study_on_localhost_read_only(run_dir, tmp_path):
    log = tmp_path / "dashboard.log"
    with dashboard_process(run_dir, log) as (proc, port):
        (study,) = studies(port)
        assert study["study_name"] == "digits_cmaes"
        status, _, body = request(port, "GET", f"/api/studies/{study['study_id']}")
        detail = json.loads(body)
        assert detail["objective_names"] == ["acc"]  # the fitness's objective, not "Objective 0"
        assert len(detail["trials"]) == BUDGET
        assert {t["state"].lower() for t in detail["trials"]} == {"complete"}

        status, _, text = request(port, "DELETE", f"/api/studies/{study['study_id']}", body={})
        assert status == 405 and READ_ONLY in text
        status, _, _ = request(port, "GET", "/api/studies", host=f"rebound.example:{port}")
        assert status == 403
        assert [s["study_name"] for s in studies(port)] == ["digits_cmaes"]

        # Bound to loopback only: the printed URL, the listening socket, and no answer on any
        # other interface of this machine.
        printed = " ".join(log.read_text(errors="replace").split())
        assert re.search(rf"read-only, on http://127\.0\.0\.1:{port}/dashboard/", printed), printed
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert all(addr.port == port for addr in listening)
        for address in _other_addresses():
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"answers on {address}:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_process_stops_the_server(run_dir, tmp_path, sig):
    """Ctrl-C or SIGTERM ends the process (exit 0) with nothing left behind: no child process,
    nothing listening on the port, even with a request in flight."""
    with dashboard_process(run_dir, tmp_path / "dashboard.log") as (proc, port):
        assert psutil.Process(proc.pid).children(recursive=True) == []
        hanging = socket.create_connection(("127.0.0.1", port))  # an unfinished request
        hanging.sendall(b"GET /api/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        hanging.close()
    assert _port_is_free(port)
    with pytest.raises(OSError):
        request(port, "GET", "/api/studies")


@pytest.mark.slow
def test_allow_writes_lets_the_dashboard_write(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with dashboard_process(copy, tmp_path / "dashboard.log", "--allow-writes") as (_, port):
        status, _, body = request(port, "PUT", "/api/studies/1/note",
                                  body={"version": 1, "body": "checked by hand"})
        assert status == 204, body
        status, _, body = request(port, "GET", "/api/studies/1")
        assert json.loads(body)["note"]["body"] == "checked by hand"
    original = optuna.load_study(study_name="digits_cmaes", storage=f"sqlite:///{run_dir}/study.db")
    assert not _has_note(original)  # the note went to the copy's store


@pytest.mark.slow
def test_dashboard_of_a_copied_run_reads_the_copy(run_dir, tmp_path):
    """experiment.yaml records the run's absolute directory; the dashboard of a copy still opens
    the copy's study, and a copy without a study is an error, not a new empty study."""
    from evomerge.execution.run_dir import run_storage

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    _, url = run_storage(copy)
    assert url == f"sqlite:///{copy / 'study.db'}"
    (copy / "study.db").unlink()
    result = CliRunner().invoke(app, ["dashboard", str(copy), "--port", str(free_port())])
    assert result.exit_code == 2 and "no study at" in result.output
    assert not (copy / "study.db").exists()


@pytest.mark.slow
def test_a_port_in_use_fails_clearly(run_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(app, ["dashboard", str(run_dir), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(result.output.split())


def test_dashboard_of_a_directory_without_a_run_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["dashboard", str(tmp_path), "--port", str(free_port())])
    assert result.exit_code == 2
    assert "experiment.yaml" in result.output


@pytest.mark.slow
def test_dashboard_of_a_from_scratch_run_serves_one_seeds_journal(tmp_path):
    """From-scratch runs keep one journal study per seed; the dashboard opens the chosen one."""
    import yaml

    from evomerge.reproductions.scratch import scratch_storage

    shipped = Path(__file__).resolve().parents[1] / "experiments" / "digits_cmaes_scratch.yaml"
    config = yaml.safe_load(shipped.read_text())
    path = tmp_path / "scratch.yaml"
    path.write_text(yaml.safe_dump({**config, "seeds": [3, 5], "budget": 20, "record_every": 10}))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    storage, url = scratch_storage(run_dir, 5)
    assert url == str(run_dir / "seed_5" / "study.log")
    (study,) = storage.get_all_studies()
    trials = storage.get_all_trials(study._study_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    (seed_5,) = [row for row in summary["per_seed"] if row["seed"] == 5]
    assert max(t.values[0] for t in trials) == pytest.approx(seed_5["train_acc"])
    assert scratch_storage(run_dir, None)[1] == str(run_dir / "seed_3" / "study.log")
    bad = CliRunner().invoke(app, ["dashboard", str(run_dir), "--seed", "4",
                                   "--port", str(free_port())])
    assert bad.exit_code != 0 and "has seeds 3, 5" in bad.output


# ---- the trial page, as a browser renders it ---------------------------------------------------


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _rendered_dom(browser: str, url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (headless Chromium, --dump-dom)."""
    args = [browser, "--headless", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=15000",
            "--window-size=1400,3000", "--dump-dom", url]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", done.stdout, flags=re.DOTALL)


def _text(markup: str) -> str:
    """The text of an HTML fragment, as a browser shows it (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def _fenced_blocks(markdown: str) -> list[list[str]]:
    """The lines of each fenced code block of a markdown text."""
    return [block.strip("\n").splitlines()
            for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown,
                                    flags=re.DOTALL | re.MULTILINE)]


@pytest.mark.slow
def test_the_trial_page_shows_named_parameters_and_the_recipe(run_dir, tmp_path):
    """Headless Chromium renders a finished run's trial page from ``evomerge dashboard``. It
    shows every parameter under its name (not Optuna's anonymous x0..xN) with its value, and
    the trial's recipe readably: the trial note's recipe block as a multi-line code block whose
    lines are the note's, naming the merge method and every source model."""
    browser = _chromium()
    require(browser is not None, "headless Chromium (apt-get install chromium)")
    study = optuna.load_study(study_name="digits_cmaes", storage=f"sqlite:///{run_dir}/study.db")
    trial = study.best_trial
    recipe = trial.user_attrs["evomerge"]["recipe"]

    with dashboard_process(run_dir, tmp_path / "dashboard.log") as (_, port):
        _, _, body = request(port, "GET", f"/api/studies/{study._study_id}")
        (shown,) = [t for t in json.loads(body)["trials"] if t["number"] == trial.number]
        dom = _rendered_dom(browser, f"http://127.0.0.1:{port}/dashboard/studies/"
                            f"{study._study_id}/trials?numbers={trial.number}", tmp_path)
    text = " ".join(_text(re.sub(r"<", " <", dom)).split())
    assert f"Trial {trial.number} (trial_id={trial._trial_id})" in text, text[:2000]

    # Named parameters, each with its value.
    assert trial.params
    anonymous = [name for name in trial.params if re.fullmatch(r"x\d+", name)]
    assert not anonymous, f"parameters still named {anonymous}"
    for name, value in trial.params.items():
        assert f"{name} {value!r}" in text, (name, value)

    # The readable recipe: the note's code block, rendered line for line in a <pre>.
    blocks = _fenced_blocks(shown["note"]["body"])
    assert blocks, f"trial {trial.number}'s note holds no recipe block: {shown['note']!r}"
    recipe_lines = max(blocks, key=len)
    pres = [_text(p).strip("\n").splitlines()
            for p in re.findall(r"<pre\b[^>]*>(.*?)</pre>", dom, flags=re.DOTALL)]
    assert [line.rstrip() for line in recipe_lines] in [[x.rstrip() for x in p] for p in pres], (
        recipe_lines, pres)
    shown_recipe = "\n".join(recipe_lines)
    assert recipe["merge_method"] in shown_recipe
    for entry in recipe["models"]:
        label = Path(entry["model"]).name
        assert label in shown_recipe or entry["model"] in shown_recipe, label


@pytest.mark.slow
def test_the_study_page_shows_the_run_plots(run_dir, tmp_path):
    """The run's PNG plots are the study's artifacts (RUN_DIR/artifacts): the study page shows
    each as an image whose URL serves the very file in RUN_DIR."""
    browser = _chromium()
    require(browser is not None, "headless Chromium (apt-get install chromium)")
    plots = sorted(p.name for p in run_dir.glob("*.png"))
    assert plots, f"the run wrote no plots: {sorted(p.name for p in run_dir.iterdir())}"

    with dashboard_process(run_dir, tmp_path / "dashboard.log") as (_, port):
        _, _, body = request(port, "GET", "/api/studies/1")
        artifacts = {a["filename"]: a["artifact_id"] for a in json.loads(body)["artifacts"]}
        assert sorted(artifacts) == plots
        dom = _rendered_dom(browser, f"http://127.0.0.1:{port}/dashboard/studies/1", tmp_path)
        images = dict(re.findall(r'<img\b[^>]*\balt="([^"]+)"[^>]*\bsrc="([^"]+)"', dom))
        for name, artifact_id in artifacts.items():
            assert images.get(name) == f"/artifacts/1/{artifact_id}", (name, images)
            status, headers, data = request(port, "GET", images[name])
            assert (status, headers["Content-Type"]) == (200, "image/png")
            assert data == (run_dir / name).read_bytes()


@pytest.mark.slow
def test_a_finished_run_shows_as_finished(run_dir):
    with serving(f"sqlite:///{run_dir}/study.db") as port:
        (study,) = studies(port)
    assert {a["key"]: a["value"] for a in study["user_attrs"]}["finished"] == "True"
