"""The benchmark harness in CPU smoke mode: it runs in seconds and writes valid results.

Everything goes to a tmp folder, never to benchmarks/results.
"""

from __future__ import annotations

import importlib.util
import json
import tarfile

import pytest
import torch
from ursa_engine.benchmarks import BENCHES, report
from ursa_engine.benchmarks.harness import Deadline, Work, measure
from ursa_engine.benchmarks.records import BenchContext, ResultWriter, check_targets, classify_failure
from ursa_engine.benchmarks.run import run_suite

CPU = torch.device("cpu")
# every record carries these (issue 6: device, driver, commit, versions, shape, provider, timings,
# throughput, floor and ratio, ratio to dense, peak memory)
RECORD_KEYS = {"suite", "case", "provider", "status", "reason", "device_name", "driver", "commit", "torch",
               "triton", "shape", "median_ms", "min_ms", "max_ms", "throughput", "throughput_unit",
               "floor_ms", "ratio_to_floor", "dense_ms", "ratio_to_dense", "speedup_vs_dense",
               "peak_mem_bytes", "peak_extra_bytes", "data_seed", "targets", "meets"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = [run_suite(name, mode="smoke", out_dir=out, device=CPU, deadline=Deadline(120), quiet=True)
             for name in BENCHES]
    return out, paths


def test_smoke_writes_one_json_per_suite_named_by_op_device_commit(smoke_results):
    out, paths = smoke_results
    assert sorted(p.name.split("-")[0] for p in paths) == sorted(BENCHES)
    for p in paths:
        assert p.parent == out and p.suffix == ".json"
        name = p.name
        doc = json.loads(p.read_text())
        assert name.startswith(f"{doc['suite']}-smoke-cpu-{str(doc['commit'])[:7]}-")
        assert doc["schema"] == "ursa-bench/1" and doc["ceilings"]["copy_bytes_per_s"] > 0
        assert doc["device"]["name"] and doc["software"]["torch"] == torch.__version__


def test_smoke_records_are_complete_and_consistent(smoke_results):
    _, paths = smoke_results
    ok = 0
    for p in paths:
        for rec in json.loads(p.read_text())["records"]:
            assert RECORD_KEYS <= rec.keys(), RECORD_KEYS - rec.keys()
            assert rec["status"] in ("ok", "skipped", "error")
            assert rec["status"] != "error", rec["reason"]
            if rec["status"] != "ok":
                assert rec["reason"]
                continue
            ok += 1
            assert 0 < rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"]
            if rec["floor_ms"]:
                assert rec["ratio_to_floor"] == pytest.approx(rec["median_ms"] / rec["floor_ms"])
            if rec["dense_ms"]:
                assert rec["speedup_vs_dense"] == pytest.approx(rec["dense_ms"] / rec["median_ms"])
    assert ok >= 5


def test_smoke_times_real_sampler_ops_on_the_dense_reference(smoke_results):
    _, paths = smoke_results
    recs = [r for p in paths for r in json.loads(p.read_text())["records"]]
    steps = [r for r in recs if r["suite"] == "metric_step" and r["provider"] == "torch"]
    assert steps and all(r["status"] == "ok" for r in steps)
    fsq = [r for r in steps if r["shape"]["codebook"].startswith("fsq")]
    assert all(r["shape"]["cfg_pair"] and r["floor_bound"] == "memory" for r in fsq)
    samples = [r for r in recs if r["suite"] == "metric_sample" and r["provider"] == "torch"]
    assert samples and all(r["status"] == "ok" for r in samples)


def test_report_builds_markdown_and_plot_from_json(smoke_results, tmp_path):
    out, _ = smoke_results
    md, png = report.write_report([out], tmp_path)
    text = md.read_text()
    assert "| case | provider | median ms" in text and "metric_step" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert png is not None and png.stat().st_size > 1000


def test_paper_comparison_is_labelled():
    rec = {"suite": "generate", "status": "ok", "median_ms": 35_000.0, "provider": "projected",
           "device_name": "GPU", "shape": {"paper_s": 70.0, "latents": [13, 30, 48], "tokens": 19_041}}
    rows = report.paper_comparison([{"records": [rec]}])
    text = "\n".join(rows)
    assert "hardware unstated" in text and "2.00×" in text and "projected" in text


def test_measure_counts_reps_and_rotates_inputs():
    seen = []
    t = measure(lambda i: seen.append(i), CPU, warmup=2, reps=7, budget_s=10)
    assert t.reps == 7 and t.warmup == 2 and len(t.samples_ms) == 7
    assert seen == list(range(9))  # warm-up 0, 1, then timed 2..8: the index rotates inputs


def test_floor_is_the_binding_roofline_term():
    from ursa_engine.benchmarks.harness import Ceilings

    c = Ceilings(copy_bytes_per_s=1e12, matmul_flops_per_s=1e15, matmul_dtype="bf16", copy_bytes=0,
                 matmul_n=0, exp_per_s=2e12, datasheet_bf16_flops=None)
    assert Work(bytes=1e9, flops=1e12).floor(c) == (pytest.approx(1.0), "memory")
    assert Work(bytes=1e9, flops=1e13).floor(c) == (pytest.approx(10.0), "matmul")
    ms, bound = Work(exps=4e9).floor(c)
    assert ms == pytest.approx(2.0) and bound.startswith("exp")


def test_targets_and_failure_classes():
    rec = {"ratio_to_floor": 1.2, "speedup_vs_dense": 25.0, "mfu": None,
           "targets": {"max_ratio_to_floor": 1.3, "min_speedup_vs_dense": 30, "min_mfu": 0.5}}
    assert check_targets(rec) == {"max_ratio_to_floor": True, "min_speedup_vs_dense": False}
    assert classify_failure(RuntimeError("backend='native' cannot run metric_step: not built"))[0] == "skipped"
    assert classify_failure(ValueError("logits: bad shape"))[0] == "error"


def test_a_failing_case_becomes_a_record_and_the_run_goes_on(tmp_path):
    header = {"device": {"name": "cpu"}, "software": {}, "commit": "x", "mode": "smoke",
              "created": "2026-01-01T00:00:00Z"}
    writer = ResultWriter(tmp_path / "r.json", header, None)
    ctx = BenchContext(suite="t", mode="smoke", device=CPU, deadline=Deadline(60), ceilings=None,
                       header=header, writer=writer, quiet=True)

    def broken():
        raise RuntimeError("boom")

    ctx.bench(case="c", provider="p", setup=broken, work=Work(bytes=1), shape={})
    ctx.bench(case="c", provider="q", setup=lambda: (lambda i: torch.ones(4).sum()), work=Work(bytes=1),
              shape={})
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    assert [r["status"] for r in recs] == ["error", "ok"] and "boom" in recs[0]["reason"]


def test_gpu_suite_rehearsal_packs_at_most_eight_files(tmp_path):
    from ursa_engine.benchmarks import gpu_suite

    out = tmp_path / "out"
    gpu_suite.main(["--out", str(out), "--mode", "smoke", "--skip-install", "--tests", "none",
                    "--budget", "120", "metric_step"])
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"suite.log", "suite.json", "summary.md", "results.tar.gz"} <= set(files)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert len(names) == 1 and names[0].startswith("metric_step-smoke-cpu-")
    stages = json.loads((out / "suite.json").read_text())["stages"]
    assert stages[-1]["stage"] == "bench metric_step" and stages[-1]["rc"] == 0


def test_cli_bench_run(tmp_path):
    from ursa_engine.cli import main

    assert main(["bench", "run", "--mode", "smoke", "--quiet", "--out", str(tmp_path), "metric_step"]) == 0
    assert len(list(tmp_path.glob("metric_step-smoke-cpu-*.json"))) == 1


def test_smoke_vae_plans_real_sizes_and_the_plan_equals_the_tracked_real_call(smoke_results):
    """bench_vae: tiny tokenizers timed on the CPU, whose LiveBytes peak on the real tensors equals
    the fake-tensor plan of the same call; the real-size decodes planned (plain and chunked)."""
    _, paths = smoke_results
    recs = [r for p in paths for r in json.loads(p.read_text())["records"] if r["suite"] == "vae"]
    measured = [r for r in recs if r["provider"] in ("chunked", "plain")]
    assert {r["shape"]["op"] for r in measured} == {"decode", "encode"}
    for r in measured:
        assert r["status"] == "ok", r["reason"]
        assert r["tracked_peak_extra_bytes"] == r["planned_peak_extra_bytes"] > 0
        assert r["work"]["flops"] > 0 and r["floor_ms"] and r["output_shape"]
    plans = {(r["case"], r["provider"]): r for r in recs if r["provider"].startswith("plan-")}
    generation_step = 12.8e9  # one 1.7B CFG video step: weights + logits (DESIGN §6)
    for case, frames in (("cosmos-decode-13x40x64-bf16", 33), ("cosmos-sf49-decode-13x40x64-bf16", 49),
                         ("ibq1024-decode-1x64x64-bf16", 1)):
        for provider in ("plan-chunked", "plan-plain"):
            r = plans[(case, provider)]
            assert r["status"] == "ok" and r["shape"]["num_frames"] == frames == r["output_shape"][2]
            assert 0 < r["peak_extra_bytes"] == r["planned_peak_extra_bytes"] < r["peak_mem_bytes"] < generation_step
            assert r["planned_flops"] > 1e12 and r["granularity"] == 512
    assert "tiling_note" in plans[("cosmos-decode-13x40x64-bf16", "plan-plain")]["shape"]


def test_gpu_suite_gives_every_suite_a_share():
    from ursa_engine.benchmarks import gpu_suite

    assert set(gpu_suite.WEIGHTS) == set(BENCHES)


# ----------------------------------------------------------------------------- bring-up (issue 12)
def test_gpu_suite_output_starts_with_what_to_fix(tmp_path, monkeypatch, capsys):
    """A failed stage: the first lines of stdout, suite.log and summary.md are the ACTION list with
    the stage, its first error line and the file to look at; a clean run says ``ACTION: none``."""
    import sys

    from ursa_engine.benchmarks import gpu_suite

    def failing_bench(self, names, mode):
        code = "print('warming up'); raise ValueError('logits: bad shape')"
        self.sh("bench metric_step", [sys.executable, "-c", code], 60)

    monkeypatch.setattr(gpu_suite.Suite, "benches", failing_bench)
    monkeypatch.setattr(gpu_suite, "predicted_rows", lambda records: {"rows": []})  # tested on its own below
    out = tmp_path / "out"
    gpu_suite.main(["--out", str(out), "--mode", "smoke", "--skip-install", "--tests", "none", "--budget", "120"])
    stdout = capsys.readouterr().out
    first = "ACTION: 1 thing(s) to fix"
    for text in (stdout, (out / "suite.log").read_text(), (out / "summary.md").read_text()):
        lines = text.splitlines()
        assert lines[0] == first, lines[:3]
        assert lines[1].startswith("  1. [bench metric_step] rc=1: ValueError: logits: bad shape")
        assert lines[1].endswith("-- look at: benchmarks/bench_metric_step.py")
    assert json.loads((out / "suite.json").read_text())["actions"][0].startswith("[bench metric_step] rc=1")
    monkeypatch.setattr(gpu_suite.Suite, "benches", lambda self, names, mode: None)
    gpu_suite.main(["--out", str(tmp_path / "ok"), "--mode", "smoke", "--skip-install", "--tests", "none"])
    assert capsys.readouterr().out.startswith("ACTION: none")
    assert (tmp_path / "ok" / "summary.md").read_text().startswith("ACTION: none")


def test_action_list_first_error_line_and_file():
    from ursa_engine.benchmarks import gpu_suite

    repo = gpu_suite.ROOT
    pytest_out = ["....F", "FAILED tests/test_native.py::test_cuda_step - AssertionError: 0.91 < 0.99", "1 failed"]
    install_out = ["-- Configuring done", "/x/csrc/cuda/sampler.cu(12): error: identifier \"foo\" is undefined",
                   "ninja: build stopped"]
    crash = ["Traceback (most recent call last):", f'  File "{repo}/ursa_engine/engine.py", line 400, in generate',
             f'  File "{repo}/triton_kernels/sampler.py", line 77, in metric_step',
             "RuntimeError: CUDA error: an illegal memory access was encountered"]
    stages = [{"stage": "install", "rc": 1}, {"stage": "tests", "rc": 1, "failures": 1},
              {"stage": "bench generate", "rc": -9, "timed_out": True, "seconds": 80.0},
              {"stage": "devices", "rc": 0, "devices": {"problems": [{"what": "engine on cuda:1: tokens differ",
                                                                       "file": "ursa_engine/ops_library.py"}]}},
              {"stage": "bench vae", "rc": 0}]
    docs = [{"records": [{"suite": "metric_step", "case": "fsq", "provider": "native", "status": "error",
                          "reason": "boom"}, {"suite": "vae", "status": "ok"}]}]
    items = gpu_suite.actions(stages, {"install": install_out, "tests": pytest_out, "bench generate": crash}, docs,
                              {"rows": [], "error": "predicted module missing", "missing": True})
    assert items == [
        '[install] rc=1: /x/csrc/cuda/sampler.cu(12): error: identifier "foo" is undefined -- look at: '
        'csrc/cuda/sampler.cu',
        "[tests] rc=1: FAILED tests/test_native.py::test_cuda_step - AssertionError: 0.91 < 0.99 -- look at: "
        "tests/test_native.py::test_cuda_step",
        "[bench generate] timed out after 80.0 s; last line: RuntimeError: CUDA error: an illegal memory access was "
        "encountered -- look at: triton_kernels/sampler.py:77",
        "[devices] engine on cuda:1: tokens differ -- look at: ursa_engine/ops_library.py",
        "[bench metric_step] fsq / native: boom -- look at: benchmarks/bench_metric_step.py"]
    block = gpu_suite.action_block(items).splitlines()
    assert block[0] == "ACTION: 5 thing(s) to fix" and block[1].startswith("  1. [install]")
    assert gpu_suite.actions([{"stage": "tests", "rc": 0}], {}, [], {"rows": [], "error": "compare() failed: x"}) == [
        "[predicted] compare() failed: x -- look at: benchmarks/predicted.py"]


def test_predicted_vs_measured_comes_from_the_predicted_module(monkeypatch):
    import sys
    import types

    from ursa_engine.benchmarks import gpu_suite

    fake = types.ModuleType("ursa_engine.benchmarks.predicted")
    fake.compare = lambda records: [{"kernel": "metric_step_fsq", "case": r["case"], "measured_s": 2e-3,
                                     "predicted_s": 1e-3, "ratio": 2.0} for r in records if r["status"] == "ok"]
    monkeypatch.setitem(sys.modules, "ursa_engine.benchmarks.predicted", fake)
    rows = gpu_suite.predicted_rows([{"case": "fsq-d4096", "status": "ok"}, {"case": "x", "status": "skipped"}])
    assert rows == {"rows": [{"kernel": "metric_step_fsq", "case": "fsq-d4096", "measured_s": 2e-3,
                              "predicted_s": 1e-3, "ratio": 2.0}]}
    assert "| metric_step_fsq | fsq-d4096 | 2 | 1 | 2.00 |" in gpu_suite.predicted_markdown(rows)
    fake.compare = lambda records: 1 / 0
    assert gpu_suite.predicted_rows([])["error"].startswith("compare() failed: ZeroDivisionError")
    monkeypatch.setitem(sys.modules, "ursa_engine.benchmarks.predicted", None)  # not importable
    missing = gpu_suite.predicted_rows([])
    assert missing["missing"] and "not importable" in gpu_suite.predicted_markdown(missing)


def test_second_device_check_is_skipped_with_a_reason_on_one_device(monkeypatch):
    """One GPU (simulated here): no second-device run, the reason recorded; the native CUDA module's
    report is there, and its unavailability on a GPU host is a problem for the ACTION list."""
    from ursa_engine.benchmarks import gpu_suite

    result = gpu_suite.device_check()
    assert result["status"] == "skipped" and result["reason"].startswith("0 CUDA device(s)")
    assert result["runs"] == [] and result["problems"] == [] and "loaded" in result["native_cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = gpu_suite.device_check()
    assert result["status"] == "skipped" and result["reason"].startswith("1 CUDA device(s)")
    if result["native_cuda"]["unavailable"] is not None:  # no GPU really here: the native module says why
        assert result["problems"][0]["what"].startswith("native CUDA backend: ")


def test_devices_stage_runs_in_its_own_process_and_records_the_skip(tmp_path):
    from ursa_engine.benchmarks import gpu_suite

    suite = gpu_suite.Suite(tmp_path, budget=300)
    stage = suite.devices(120, mode="gpu")
    suite.log_file.close()
    assert stage["rc"] == 0 and stage["devices"]["status"] == "skipped" and stage["skipped"].startswith("0 CUDA")
    assert not (tmp_path / "devices.json").exists()  # folded into suite.json: 8 files come back at most
    assert gpu_suite.actions([stage], suite.outputs, [], {}) == []
    smoke = gpu_suite.Suite(tmp_path / "s", budget=60).devices(60, mode="smoke")
    assert smoke["rc"] is None and "smoke" in smoke["skipped"]
