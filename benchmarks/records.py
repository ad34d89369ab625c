"""Result records: one dict per (case, provider), the JSON writer, and the context a benchmark
runs in (device, mode, deadline, ceilings). Every failure becomes a record; nothing is lost
when a run is killed (the JSON is rewritten after every record).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import telemetry
from .harness import Ceilings, Deadline, Timing, Work, measure, peak_memory

SCHEMA = "ursa-bench/1"


def classify_failure(err: BaseException) -> tuple[str, str]:
    """("skipped", why) for a backend that is not there, else ("error", what happened)."""
    text = f"{type(err).__name__}: {err}".strip()
    low = text.lower()
    absent = ("cannot run", "not available", "unavailable", "not importable", "not built",
              "not installed", "no module named", "requires cuda", "no cuda")
    if isinstance(err, (ImportError, NotImplementedError)) or any(s in low for s in absent):
        return "skipped", text[:500]
    return "error", text[:2000]


class ResultWriter:
    """One JSON file per run; rewritten atomically after every record (nothing lost on a kill)."""

    def __init__(self, path: Path, header: dict, ceilings: Ceilings | None):
        self.path = Path(path)
        self.header = header
        self.ceilings = ceilings
        self.records: list[dict] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        doc = {"schema": SCHEMA, **self.header,
               "ceilings": asdict(self.ceilings) if self.ceilings else None,
               "records": self.records}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.path)


def result_path(out_dir: Path, suite: str, header: dict) -> Path:
    """``<suite>-<mode>-<device>-<commit7>-<UTC time>.json``: named by op, device and commit."""
    stamp = header["created"].replace("-", "").replace(":", "")
    commit = str(header.get("commit", "unknown"))[:7]
    device = telemetry.device_slug(header["device"])
    return Path(out_dir) / f"{suite}-{header['mode']}-{device}-{commit}-{stamp}.json"


@dataclass
class BenchContext:
    """What a ``bench_<op>.run(ctx)`` needs: device, mode, deadline, ceilings, the writer."""

    suite: str
    mode: str
    device: torch.device
    deadline: Deadline
    ceilings: Ceilings | None
    header: dict
    writer: ResultWriter | None
    case_budget_s: float = 2.0
    quiet: bool = False
    data_seed: int = field(default_factory=lambda: secrets.randbits(48))

    def generator(self) -> torch.Generator:
        """A generator for this run's fresh random data (seed recorded in every record)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.data_seed)
        return gen

    # ------------------------------------------------------------------ one measured case
    def bench(self, *, case: str, provider: str, setup: Callable[[], Callable[[int], object]],
              work: Work, shape: dict, dense_ms: float | None = None, scale: float = 1.0,
              scale_note: str | None = None, targets: dict | None = None,
              warmup: int = 2, reps: int = 25, extra: dict | None = None, mfu: bool = False,
              baselines: dict[str, float] | None = None) -> dict:
        """Set up, warm up, time and record one (case, provider); failures become records.

        ``setup()`` builds inputs and returns ``fn(i)``; ``scale`` multiplies the times (the
        dense reference timed on a subset of tokens and scaled linearly, said in ``scale_note``).
        ``mfu``: report ``work.flops`` as model FLOPs utilisation. ``baselines``: name -> ms of
        other figures of the same run, reported as ``speedup_vs_<name>``.
        """

        def run() -> dict:
            fn = setup()
            budget = max(0.05, min(self.case_budget_s, self.deadline.left() / 4))
            timing = measure(fn, self.device, warmup=warmup, reps=reps, budget_s=budget)
            peak, peak_extra = peak_memory(fn, self.device)
            return {"timing": timing, "peak": peak, "peak_extra": peak_extra}

        return self.attempt(run, case=case, provider=provider, work=work, shape=shape, dense_ms=dense_ms,
                            scale=scale, scale_note=scale_note, targets=targets, extra=extra, mfu=mfu,
                            baselines=baselines)

    def attempt(self, run: Callable[[], dict], *, case: str, provider: str, work: Work, shape: dict,
                margin_s: float = 5.0, **fields) -> dict:
        """Record what ``run()`` measured (a dict of :meth:`record` arguments: ``timing``, ``peak``,
        ``extra``...), or why it could not: out of time, a backend that is not there, an error.
        """
        extra = dict(fields.pop("extra", None) or {})
        if self.deadline.expired(margin=margin_s):
            return self.skip(case=case, provider=provider, shape=shape, work=work,
                             reason="global time budget exhausted", extra=extra)
        try:
            got = run()
            sample = telemetry.nvml_sample(self.device)
        except Exception as err:  # noqa: BLE001 - every failure is a result, the run goes on
            status, reason = classify_failure(err)
            if status == "error" and not self.quiet:
                traceback.print_exc(file=sys.stderr)
            return self.skip(case=case, provider=provider, shape=shape, work=work, reason=reason,
                             status=status, extra=extra)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        extra.update(got.pop("extra", None) or {})
        return self.record(case=case, provider=provider, shape=shape, work=work, sample=sample, extra=extra,
                           **fields, **got)

    def mfu(self, flops: float, ms: float) -> dict:
        """Model FLOPs utilisation against the datasheet bf16 peak (the usual MFU) and against
        the matmul rate measured in this run."""
        rate = flops / (ms * 1e-3)
        c = self.ceilings
        peak = c.datasheet_bf16_flops if c and c.datasheet_bf16_flops else None
        out = {"tflops": rate / 1e12,
               "mfu": rate / peak if peak else (rate / c.matmul_flops_per_s if c else None),
               "mfu_peak_source": "datasheet bf16" if peak else "measured matmul (no datasheet)",
               "mfu_vs_measured_matmul": rate / c.matmul_flops_per_s if c else None}
        return out

    def skip(self, *, case: str, provider: str, shape: dict, work: Work, reason: str,
             status: str = "skipped", extra: dict | None = None) -> dict:
        return self.record(case=case, provider=provider, shape=shape, work=work, status=status,
                           reason=reason, extra=extra)

    def record(self, *, case: str, provider: str, shape: dict, work: Work, timing: Timing | None = None,
               status: str = "ok", reason: str | None = None, scale: float = 1.0,
               scale_note: str | None = None, dense_ms: float | None = None,
               targets: dict | None = None, peak: int | None = None, peak_extra: int | None = None,
               sample: dict | None = None, extra: dict | None = None, mfu: bool = False,
               baselines: dict[str, float] | None = None) -> dict:
        dev = self.header["device"]
        soft = self.header["software"]
        rec = {
            "suite": self.suite, "case": case, "provider": provider, "status": status,
            "reason": reason, "mode": self.mode,
            "device_name": dev.get("name"), "driver": dev.get("driver"),
            "commit": self.header.get("commit"), "dirty": self.header.get("dirty"),
            "torch": soft.get("torch"), "triton": soft.get("triton"), "cuda": soft.get("torch_cuda"),
            "threads": soft.get("torch_threads"), "data_seed": self.data_seed,
            "shape": shape, "work": asdict(work),
            "median_ms": None, "min_ms": None, "max_ms": None, "mean_ms": None, "reps": None,
            "throughput": None, "throughput_unit": None,
            "floor_ms": None, "floor_bound": None, "ratio_to_floor": None,
            "dense_ms": dense_ms, "ratio_to_dense": None, "speedup_vs_dense": None,
            "scaled": scale != 1.0, "scale_note": scale_note,
            "peak_mem_bytes": peak, "peak_extra_bytes": peak_extra,
            "telemetry": sample or {}, "targets": targets or {}, "meets": {},
        }
        if extra:
            rec.update(extra)
        if timing is not None:
            rec.update(median_ms=timing.median_ms * scale, min_ms=timing.min_ms * scale,
                       max_ms=timing.max_ms * scale, mean_ms=timing.mean_ms * scale, reps=timing.reps,
                       samples_ms=[round(v * scale, 5) for v in timing.samples_ms[:64]])
            rec["floor_ms"], rec["floor_bound"] = work.floor(self.ceilings)
            rec["throughput"], rec["throughput_unit"] = work.throughput(rec["median_ms"], rec["floor_bound"])
            if rec["floor_ms"]:
                rec["ratio_to_floor"] = rec["median_ms"] / rec["floor_ms"]
            if dense_ms:
                rec["ratio_to_dense"] = rec["median_ms"] / dense_ms
                rec["speedup_vs_dense"] = dense_ms / rec["median_ms"]
            for name, ms in (baselines or {}).items():
                rec[f"speedup_vs_{name}"] = ms / rec["median_ms"] if ms else None
            if mfu and work.flops:
                rec.update(self.mfu(work.flops, rec["median_ms"]))
            rec["meets"] = check_targets(rec)
        if self.writer is not None:
            self.writer.add(rec)
        if not self.quiet:
            print(format_line(rec), flush=True)
        return rec


def check_targets(rec: dict) -> dict:
    """Targets against the record's own figures: ``"max_<field>"`` / ``"min_<field>"`` -> bool.

    E.g. ``max_ratio_to_floor``, ``min_speedup_vs_dense``, ``min_mfu``, ``max_peak_mem_bytes``,
    ``max_peak_extra_bytes``, ``min_speedup_vs_eager``. Figures that are absent are not judged.
    """
    out = {}
    for target, bound in (rec.get("targets") or {}).items():
        kind, _, key = target.partition("_")
        value = rec.get(key)
        if kind in ("min", "max") and isinstance(value, (int, float)):
            out[target] = bool(value >= bound if kind == "min" else value <= bound)
    return out


def format_line(rec: dict) -> str:
    """One human line per record for the log."""
    head = f"[{rec['suite']}] {rec['case']:<34} {rec['provider']:<14}"
    if rec["status"] != "ok":
        return f"{head} {rec['status'].upper()}: {rec['reason']}"
    parts = [f"{rec['median_ms']:10.3f} ms"]
    if rec["throughput"] is not None:
        parts.append(f"{rec['throughput']:9.1f} {rec['throughput_unit']}")
    if rec["ratio_to_floor"] is not None:
        parts.append(f"{rec['ratio_to_floor']:6.2f}x floor")
    if rec["speedup_vs_dense"] is not None:
        parts.append(f"{rec['speedup_vs_dense']:7.1f}x vs dense")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if rec["peak_mem_bytes"] is not None:
        parts.append(f"peak {rec['peak_mem_bytes'] / 2**30:.2f} GiB")
    if rec["scaled"]:
        parts.append("(scaled)")
    return f"{head} " + "  ".join(parts)
