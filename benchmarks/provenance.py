"""Where a result JSON comes from, and the one rule for writing it (issue 20, item 5).

Every tool that writes figures to keep (``benchmarks/run.py`` through :class:`.records.ResultWriter`,
and the standalone writers ``bench_parallel``, ``bench_linear_ce``, ``bench_serve``,
``bench_native_cpu``, ``compile_report``) follows one rule, checked **before** any work is done:

* the git tree is clean (``git status --porcelain --untracked-files=no`` prints nothing: no
  modified or staged tracked file; untracked files do not count, or the first result file of a
  run would make the next one dirty), or
* the run was started with ``--allow-dirty``; the file then says so.

Otherwise :class:`DirtyTree` is raised (the CLIs exit 2 with the list of changed files) and no file
is written. Every such JSON carries ``"provenance": {"commit", "dirty", "source", "allow_dirty",
"result"}``.

Not decidable, not refused: a copy of the tree without ``.git`` (the device machine gets one; the
commit then comes from ``$URSA_COMMIT``) is stamped ``dirty: null``.

Smoke output is **not** a result: ``--mode smoke`` of the harness measures toy shapes on the CPU to
check the harness itself (CI, ``make bench-smoke``), its figures are never quoted or committed, so it
is written from any tree, stamped with the same provenance and ``"result": false``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from . import telemetry

REPO_ROOT = telemetry.REPO_ROOT  # the repository checked (a module global: tests point it at a temporary repo)


class DirtyTree(RuntimeError):
    """A result JSON was asked for from a tree with uncommitted changes, without ``--allow-dirty``."""


def changed_files(root: Path | None = None) -> list[str]:
    """Tracked files with uncommitted changes (``git status --porcelain --untracked-files=no``), or []."""
    root = REPO_ROOT if root is None else root
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def check(*, allow_dirty: bool = False, result: bool = True, root: Path | None = None) -> dict:
    """The provenance stamp of a JSON about to be made; raises :class:`DirtyTree` when the rule refuses it.

    Parameters
    ----------
    allow_dirty : write from a dirty tree anyway (the stamp says ``allow_dirty: true``)
    result : False for output that is not a result (smoke mode): stamped, never refused
    root : the repository (default: :data:`REPO_ROOT`, this checkout)

    Returns
    -------
    dict : ``{"commit", "dirty", "source", "allow_dirty", "result"}``; ``dirty`` is None when unknown
    """
    root = REPO_ROOT if root is None else root
    g = telemetry.git_commit(root)
    if g["dirty"] and result and not allow_dirty:
        files = changed_files(root)
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        raise DirtyTree(f"refusing to write a result from a dirty tree (commit {g['commit'][:12]}; changed: "
                        f"{shown or 'unknown'}): commit first, or pass --allow-dirty (the file is then stamped so)")
    return {"commit": g["commit"], "dirty": g["dirty"], "source": g["source"], "allow_dirty": bool(allow_dirty),
            "result": bool(result)}


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-dirty`` on a tool's command line."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write result JSONs from a tree with uncommitted changes (stamped dirty); "
                             "refused otherwise")


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``):
    an interrupted run leaves the previous file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, doc: dict, stamp: dict, **dump) -> Path:
    """Write ``doc`` with ``"provenance": stamp`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**doc, "provenance": stamp}, f, **({"indent": 1} | dump))
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def refuse(err: DirtyTree) -> int:
    """Print the refusal for a CLI; its exit status (2)."""
    import sys

    print(f"error: {err}", file=sys.stderr)
    return 2
