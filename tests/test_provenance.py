"""Result JSONs and the tree they come from (issue 20, item 5; :mod:`ursa_engine.benchmarks.provenance`).

In a temporary git repository: a clean tree writes, a modified tracked file refuses (no file
written) unless ``--allow-dirty``, and the file is stamped either way; smoke output is not a
result (written and stamped from a dirty tree). Each writer is run through its own command line:
``benchmarks/run.py`` (``ursa-engine bench run``), ``bench_parallel``, ``compile_report``,
``bench_linear_ce`` (refusals happen before any work, so these are fast).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ursa_engine.benchmarks import bench_linear_ce, bench_parallel, compile_report, provenance
from ursa_engine.benchmarks import run as bench_run
from ursa_engine.benchmarks.harness import Deadline


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A temporary git repository with one committed file, checked instead of this checkout."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "test")
    (root / "kernel.py").write_text("x = 1\n")
    _git(root, "add", "kernel.py")
    _git(root, "commit", "-q", "-m", "one file")
    monkeypatch.setattr(provenance, "REPO_ROOT", root)
    return root


def _dirty(root: Path) -> None:
    (root / "kernel.py").write_text("x = 2\n")


def _sha(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_clean_tree_is_stamped_clean(repo):
    (repo / "untracked.json").write_text("{}")  # untracked files (earlier results) do not count
    stamp = provenance.check()
    assert stamp == {"commit": _sha(repo), "dirty": False, "source": "git", "allow_dirty": False, "result": True}


def test_dirty_tree_is_refused_unless_allowed(repo):
    _dirty(repo)
    with pytest.raises(provenance.DirtyTree, match=r"kernel\.py.*--allow-dirty"):
        provenance.check()
    stamp = provenance.check(allow_dirty=True)
    assert stamp["dirty"] is True and stamp["allow_dirty"] is True
    smoke = provenance.check(result=False)  # not a result: stamped, never refused
    assert smoke["dirty"] is True and smoke["result"] is False and smoke["allow_dirty"] is False
    _git(repo, "add", "kernel.py")  # staged but not committed: still dirty
    with pytest.raises(provenance.DirtyTree):
        provenance.check()


def test_no_git_is_unknown_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("URSA_COMMIT", "abc1234")
    assert provenance.check() == {"commit": "abc1234", "dirty": None, "source": "URSA_COMMIT", "allow_dirty": False,
                                  "result": True}


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    provenance.write_json(path, {"a": 1}, {"dirty": False})
    assert json.loads(path.read_text()) == {"a": 1, "provenance": {"dirty": False}}
    with pytest.raises(TypeError):
        provenance.write_json(path, {"a": object()}, {"dirty": False})
    assert json.loads(path.read_text())["a"] == 1  # the old file stands, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_bench_run_cli_refuses_dirty_cpu_results_but_writes_smoke(repo, tmp_path, capsys):
    _dirty(repo)
    out = tmp_path / "out"
    assert bench_run.main(["vae", "--mode", "cpu", "--out", str(out)]) == 2
    assert "--allow-dirty" in capsys.readouterr().err and not out.exists()
    with pytest.raises(provenance.DirtyTree):
        bench_run.run_suite("vae", mode="cpu", out_dir=out, device=torch.device("cpu"))
    assert not out.exists()
    # smoke mode: not a result, written from the dirty tree and stamped so
    path = bench_run.run_suite("metric_step", mode="smoke", out_dir=out, device=torch.device("cpu"),
                               deadline=Deadline(60), quiet=True)
    stamp = json.loads(path.read_text())["provenance"]
    assert stamp == {"commit": _sha(repo), "dirty": True, "source": "git", "allow_dirty": False, "result": False}


def test_standalone_writers_refuse_dirty_and_stamp_allowed(repo, tmp_path, capsys):
    _dirty(repo)
    out = tmp_path / "out"
    assert bench_parallel.main(["--out", str(out)]) == 2 and not out.exists()
    assert compile_report.main(["--json", str(out / "c.json"), "--no-cuda"]) == 2 and not out.exists()
    assert bench_linear_ce.main(["--json", str(out / "l.json"), "--n", "8", "--hidden", "8", "--K", "16"]) == 2
    assert not out.exists()
    assert capsys.readouterr().err.count("refusing to write a result from a dirty tree") == 3
    assert bench_parallel.main(["--out", str(out), "--allow-dirty"]) == 0
    (path,) = out.glob("parallel-bytes-*.json")
    doc = json.loads(path.read_text())
    assert doc["rows"] and doc["provenance"]["dirty"] is True and doc["provenance"]["allow_dirty"] is True
    _git(repo, "commit", "-q", "-am", "now clean")
    path.unlink()
    assert bench_parallel.main(["--out", str(out)]) == 0
    assert json.loads(path.read_text())["provenance"] == {"commit": _sha(repo), "dirty": False, "source": "git",
                                                          "allow_dirty": False, "result": True}
