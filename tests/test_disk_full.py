"""A full disk during an export: one clear line, nothing published, no temporary left, and the
same export succeeds once there is room.

The real cases write to a small tmpfs (``mount -t tmpfs``, needs root; skipped where mounting is
not permitted). The simulated cases make the writes raise what a full disk raises (safetensors'
own error carrying "os error 28", an ``OSError`` with ``ENOSPC``/``EDQUOT``) and always run.
"""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import safetensors
import torch
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge import checkpoints, export

try:
    from helpers import Family, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import Family, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    """hidden 32, 3 layers, fp32: about 125 KB of weights per model."""
    return make_family(tmp_path_factory.mktemp("disk_full"), n_sources=2)


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MB tmpfs at ``tmp_path / "disk"``; ``fill(free)`` leaves about ``free`` bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, free: int) -> Path:
    """Write a filler file so that about ``free`` bytes stay free on ``disk``."""
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - free
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(size, 0))
    return filler


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def assert_one_line(message: str, out: Path) -> None:
    assert "\n" not in message.strip()
    assert message.startswith(f"no space left on device writing {out}:")
    assert "nothing was written" in message and "free space and run again" in message


# ---- a real full disk (tmpfs) -------------------------------------------------------------------


def test_an_export_larger_than_the_free_space_is_refused_before_writing(family, tmpfs):
    state = checkpoints.load_state_dict(family.sources[0])
    fill(tmpfs, 40_000)
    out = tmpfs / "merged"
    with pytest.raises(export.DiskFullError) as caught:
        export.export_model(state, out, base_dir=family.base)
    assert_one_line(str(caught.value), out)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert not out.exists() and not leftovers(tmpfs, "merged")


def test_running_out_of_space_mid_write_removes_the_temporary_and_a_retry_succeeds(
        family, tmpfs, monkeypatch):
    """The free-space check disabled, the shard write itself hits ENOSPC on the tmpfs."""
    monkeypatch.setattr(export, "_check_free_space", lambda out_dir, need: None)
    state = checkpoints.load_state_dict(family.sources[0])
    filler = fill(tmpfs, 40_000)
    out = tmpfs / "merged"
    with pytest.raises(export.DiskFullError) as caught:
        export.export_model(state, out, base_dir=family.base, recipe_yaml="merge_method: linear")
    assert_one_line(str(caught.value), out)
    assert not out.exists() and not leftovers(tmpfs, "merged")  # the temporary is gone
    filler.unlink()  # free space, run again
    export.export_model(state, out, base_dir=family.base, recipe_yaml="merge_method: linear")
    assert torch.equal(checkpoints.load_state_dict(out)["lm_head.weight"], state["lm_head.weight"])
    assert not leftovers(tmpfs, "merged")


def test_an_overwrite_that_runs_out_of_space_keeps_the_existing_model(family, tmpfs, monkeypatch):
    out = export.export_model(checkpoints.load_state_dict(family.sources[0]), tmpfs / "merged",
                          base_dir=family.base)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "_check_free_space", lambda out_dir, need: None)
    fill(tmpfs, 40_000)
    with pytest.raises(export.DiskFullError, match=r"\(the existing one is unchanged\)"):
        export.export_model(checkpoints.load_state_dict(family.sources[1]), out, base_dir=family.base,
                        overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not leftovers(tmpfs, "merged")


def test_evomerge_merge_onto_a_full_disk_prints_one_line_and_exits_2(family, tmpfs, tmp_path):
    config = tmp_path / "linear.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(s), "parameters": {"weight": 0.5}} for s in family.sources]}))
    filler = fill(tmpfs, 40_000)
    out = tmpfs / "merged"
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"error: no space left on device writing {out}:" in text
    assert "nothing was written; free space and run again" in text
    assert "Traceback" not in result.output
    assert not out.exists() and not leftovers(tmpfs, "merged")
    filler.unlink()
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ---- simulated: what the writes raise on a full disk ---------------------------------------------


def test_safetensors_running_out_of_space_is_a_disk_full_error(family, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export.safetensors.torch, "save_file", full)
    out = tmp_path / "merged"
    with pytest.raises(export.DiskFullError) as caught:
        export.export_model(checkpoints.load_state_dict(family.base), out, base_dir=family.base)
    assert_one_line(str(caught.value), out)
    assert not out.exists() and not leftovers(tmp_path, "merged")


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_an_oserror_while_writing_the_config_is_a_disk_full_error(family, tmp_path, monkeypatch,
                                                                  code, words):
    real = export._write_text

    def full(path, text):
        if path.name == "config.json":
            raise OSError(code, os.strerror(code))
        real(path, text)

    monkeypatch.setattr(export, "_write_text", full)
    out = tmp_path / "merged"
    with pytest.raises(export.DiskFullError) as caught:
        export.export_model(checkpoints.load_state_dict(family.base), out, base_dir=family.base)
    assert str(caught.value).startswith(f"{words} writing {out}:")
    assert caught.value.errno == code
    assert not out.exists() and not leftovers(tmp_path, "merged")
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.errno == code


def test_other_write_errors_pass_through_unchanged(family, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(export.safetensors.torch, "save_file", denied)
    with pytest.raises(PermissionError):
        export.export_model(checkpoints.load_state_dict(family.base), tmp_path / "merged")
    assert not leftovers(tmp_path, "merged")
