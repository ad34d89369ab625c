"""What we install is unambiguous (issue 12, finding 8): ``triton_kernels/`` and ``benchmarks/``
install as ``ursa_engine.triton_kernels`` / ``ursa_engine.benchmarks``, so unrelated packages that
own the top-level names ``triton_kernels`` (the registry's, inference stacks') or ``benchmarks``
neither shadow ours nor get shadowed by them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, sys
    import triton_kernels, benchmarks                       # the foreign packages, imported first
    import ursa_engine
    from ursa_engine import _dispatch, ops_library
    import ursa_engine.triton_kernels.sampler as ours_tk
    import ursa_engine.benchmarks.run as ours_bench
    mod, _ = _dispatch._module("triton")
    print(json.dumps({
        "foreign_tk": triton_kernels.__file__, "foreign_bench": benchmarks.__file__,
        "foreign_tk_marker": getattr(triton_kernels, "FOREIGN", None),
        "ours_tk": ours_tk.__file__, "ours_bench": ours_bench.__file__,
        "dispatch_triton": getattr(mod, "__file__", None) if mod is not None else None,
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("triton_kernels", "benchmarks")),
    }))
""")


def test_foreign_top_level_packages_do_not_change_what_we_import(tmp_path):
    for name in ("triton_kernels", "benchmarks"):
        pkg = tmp_path / "foreign" / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("FOREIGN = True\n")
        (pkg / "sampler.py").write_text("raise ImportError('the foreign package was imported')\n")
        (pkg / "run.py").write_text("raise ImportError('the foreign package was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "foreign"))
    # run outside the repository: the checkout's folders are not on sys.path, only what is installed
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["foreign_tk_marker"] is True
    assert Path(got["foreign_tk"]).parent.parent == tmp_path / "foreign"
    assert Path(got["ours_tk"]).resolve() == ROOT / "triton_kernels" / "sampler.py"
    assert Path(got["ours_bench"]).resolve() == ROOT / "benchmarks" / "run.py"
    if got["dispatch_triton"] is not None:  # triton installed: the dispatcher reaches our kernels
        assert Path(got["dispatch_triton"]).resolve() == ROOT / "triton_kernels" / "sampler.py"
    # nothing of ours was loaded under the bare names: only the foreign packages' own modules
    assert got["loaded"] == ["benchmarks", "triton_kernels"], got["loaded"]

