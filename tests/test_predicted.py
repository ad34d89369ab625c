"""benchmarks/predicted.py (issue 12): predicted H100 times from the committed compile report, the
``compare`` contract the GPU suite uses, and the README table."""

from __future__ import annotations

import pytest
from ursa_engine.benchmarks import predicted as P

KEYS = {"kernel", "case", "predicted_s", "floor_s", "bound", "blocks_per_sm"}


@pytest.fixture(scope="module")
def rows():
    return P.predicted_rows()  # the newest benchmarks/results/compile_report-sm90a-*.json


def test_rows_cover_the_design_cases(rows):
    assert all(KEYS <= set(r) for r in rows)
    cases = {(r["suite"], r["case"], r["provider"]) for r in rows}
    assert {("metric_step", "fsq-video-33280", "triton"), ("metric_sample", "fsq-train-33280", "triton"),
            ("metric_step", "ibq-image-4096", "triton"), ("mixture_step", "mixture-video-33280", "triton")} <= cases
    for r in rows:
        assert r["predicted_s"] >= r["floor_s"] > 0, r  # a prediction never beats the roofline floor


def test_floors_are_the_design_numbers(rows):
    by = {r["case"]: r for r in rows if r["provider"] == "triton"}
    assert by["fsq-video-33280"]["floor_s"] == pytest.approx(8.52e9 / 3.0e12, rel=0.01)  # DESIGN §6: 2.8 ms
    assert by["fsq-train-33280"]["floor_s"] == pytest.approx(33_280 * 64_000 / 2.1e12, rel=0.01)  # ~1 ms
    assert by["ibq-image-4096"]["floor_s"] == pytest.approx(2.15e9 / 3.0e12, rel=0.01)  # ~0.7 ms


def test_overlap_model():
    """≥ 2 blocks an SM: the terms overlap (max); 1 block: they add."""
    two, bound = P._time(dict(memory=3e9, exp=1e9), blocks=2, warps=8)
    one, _ = P._time(dict(memory=3e9, exp=1e9), blocks=1, warps=8)
    assert bound == "memory" and one > two
    assert one == pytest.approx(3e9 / (3e12 * 0.75) + 1e9 / (2.1e12 * 0.75) + P.LAUNCH_S)


def test_compare_pairs_records(rows):
    recs = [dict(suite="metric_step", case="fsq-video-33280", provider="triton", status="ok", median_ms=4.0),
            dict(suite="metric_step", case="fsq-video-33280", provider="torch", status="ok", median_ms=400.0),
            dict(suite="metric_step", case="ibq-image-4096", provider="triton", status="error", median_ms=None)]
    out = P.compare(recs, rows)
    assert len(out) == 1
    (c,) = out
    pred = next(r for r in rows if r["case"] == "fsq-video-33280" and r["provider"] == "triton")
    assert c["measured_s"] == pytest.approx(4e-3) and c["ratio"] == pytest.approx(4e-3 / pred["predicted_s"])
    assert c["measured_over_floor"] == pytest.approx(4e-3 / pred["floor_s"])


def test_markdown(rows):
    text = P.markdown(rows)
    assert text.splitlines()[0].startswith("| kernel | case | registers | spills (B) | blocks/SM | predicted")
    assert len(text.splitlines()) == len(rows) + 2
