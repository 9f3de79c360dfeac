"""``evomerge dashboard RUN_DIR`` serves optuna-dashboard for the run's study, on 127.0.0.1 by
default (DESIGN decision 8): a smoke test over real HTTP against a real subprocess."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from run_helpers import build_zoo, cli, experiment_data, free_port, run_in_process, start

pytestmark = pytest.mark.slow

BUDGET = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    zoo = build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")
    run_dir = tmp_path_factory.mktemp("dashboard") / "run"
    run_in_process(experiment_data("cmaes", zoo, run_dir, budget=BUDGET))
    return run_dir


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local URL
        return response.status, response.read()


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def test_dashboard_serves_the_study_on_localhost(run_dir, tmp_path):
    port = free_port()
    log = tmp_path / "dashboard.log"
    proc = start(cli("dashboard", run_dir, "--port", port), log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 30, None
        while status != 200:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "no answer on /dashboard/ within 30 s:\n" + (
                log.read_text(errors="replace"))
            try:
                status, page = _get(f"{base}/dashboard/", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        assert b"<html" in page.lower()

        status, body = _get(f"{base}/api/studies")
        assert status == 200
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["digits_cmaes"]
        status, body = _get(f"{base}/api/studies/{studies[0]['study_id']}")
        assert status == 200
        trials = json.loads(body)["trials"]
        assert len(trials) == BUDGET
        assert {t["state"].lower() for t in trials} == {"complete"}

        # Bound to loopback only: the printed URL, the listening socket, and no answer on any
        # other interface of this machine.
        printed = " ".join(log.read_text(errors="replace").split())
        assert re.search(rf"on http://127\.0\.0\.1:{port}/dashboard/", printed), printed
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert all(addr.port == port for addr in listening)
        for address in _other_addresses():
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"answers on {address}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait(timeout=10)


def test_dashboard_of_a_directory_without_a_run_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["dashboard", str(tmp_path), "--port", str(free_port())])
    assert result.exit_code == 2
    assert "experiment.yaml" in result.output


def test_dashboard_of_a_from_scratch_run_serves_one_seeds_journal(tmp_path):
    """From-scratch runs keep one journal study per seed; the dashboard opens the chosen one."""
    from pathlib import Path

    import yaml

    from evomerge.cli import _scratch_storage

    shipped = Path(__file__).resolve().parents[1] / "experiments" / "digits_cmaes_scratch.yaml"
    config = yaml.safe_load(shipped.read_text())
    path = tmp_path / "scratch.yaml"
    path.write_text(yaml.safe_dump({**config, "seeds": [3, 5], "budget": 20, "record_every": 10}))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    storage, url = _scratch_storage(run_dir, 5)
    assert url == str(run_dir / "seed_5" / "study.log")
    (study,) = storage.get_all_studies()
    trials = storage.get_all_trials(study._study_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    (seed_5,) = [row for row in summary["per_seed"] if row["seed"] == 5]
    assert max(t.values[0] for t in trials) == pytest.approx(seed_5["train_acc"])
    assert _scratch_storage(run_dir, None)[1] == str(run_dir / "seed_3" / "study.log")
    bad = CliRunner().invoke(app, ["dashboard", str(run_dir), "--seed", "4",
                                   "--port", str(free_port())])
    assert bad.exit_code != 0 and "has seeds 3, 5" in bad.output
