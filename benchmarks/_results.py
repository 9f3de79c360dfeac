"""Shared by the benchmark scripts: machine facts, and rewriting one section of RESULTS.md.

Each benchmark owns the text between its ``<!-- name:start -->`` / ``<!-- name:end -->`` markers
in ``benchmarks/RESULTS.md`` and rewrites only that; everything else in the file is kept.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = ("# Benchmark results\n\nEach benchmark under `benchmarks/` owns one section below, between "
          "its own `<!-- name:start -->` / `<!-- name:end -->` markers, and rewrites only that.\n")


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text from ``start`` to ``end`` (markers included; ``section`` must carry
    them) with ``section``, or append it if the file has no such markers; atomic write."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def loadavg() -> float | None:
    """The 1-minute load average (recorded with every timing: this machine is shared)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``, everything but the one JSON object goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def publish(result: dict, markdown: str, *, as_json: bool, write: bool, start: str,
            end: str) -> None:
    """A benchmark's ending: the table (on stderr under ``--json``), the one JSON object on
    stdout with ``--json``, and RESULTS.md's section rewritten with ``--write-results``."""
    import json

    with stdout_to_stderr(as_json):
        print(markdown)
    if as_json:
        print(json.dumps(result))
    if write:
        write_section(Path(__file__).resolve().parent / "RESULTS.md", markdown, start, end)


def run_main(argv: list[str] | None, parse_args: Any, run: Any, markdown: Any, start: str,
             end: str) -> int:
    """A benchmark's ``main``: parse, run (stdout to stderr under ``--json``), publish. The
    script's ``parse_args`` must define ``--json`` and ``--write-results``."""
    args = parse_args(argv)
    with stdout_to_stderr(args.json):
        result = run(args)
    publish(result, markdown(result), as_json=args.json, write=args.write_results,
            start=start, end=end)
    return 0
