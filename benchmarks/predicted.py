"""Predicted H100 SXM times of the sampler kernels (issue 12) and the fused linear cross-entropy (issue 18),
from the compile report and DESIGN §6.

Contract (``benchmarks/gpu_suite.py`` calls :func:`compare`):

* :func:`predicted_rows` ``(report=None) -> list[dict]``: one row a (kernel, case) with keys
  ``kernel, case, suite, provider, predicted_s, floor_s, bound, blocks_per_sm`` (+ ``registers``,
  ``spill_bytes``, ``note``). ``report``: a compile report dict (:mod:`.compile_report`); default:
  the newest ``benchmarks/results/compile_report-sm90a-*.json``.
* :func:`compare` ``(records, rows=None) -> list[dict]``: pairs benchmark records
  (:mod:`.records`: ``suite``, ``case``, ``provider``, ``status == "ok"``, ``median_ms``) with the
  rows of the same (suite, case, provider); returns ``kernel, suite, case, provider, measured_s,
  predicted_s, ratio`` (measured / predicted), ``floor_s``, ``measured_over_floor``. Records
  without a prediction are left out.
* :func:`markdown` ``(rows) -> str``: the README table.

Model (a prediction: nothing here has run on a GPU). Rates: DESIGN §6 (3.0 TB/s copy, 989 TFLOP/s
bf16, 2.1 G exp/s as :data:`.harness.DESIGN_EXP_PER_S`), 495 TFLOP/s dense tf32 (datasheet).
Each kernel's work is split into terms — memory bytes, tensor FLOPs, exponentials — each run at
a fraction of its rate that depends on the warps resident an SM (:func:`efficiency`). With ≥ 2
blocks an SM, one block's memory phase overlaps another's arithmetic: time = max of the terms;
with 1 block an SM the phases of a block serialize: time = sum. Plus 3 µs a launch. The floor is
the benchmarks' own (:class:`.harness.Work` ``.floor`` at the DESIGN rates, the same work the
bench suites record).
"""

from __future__ import annotations

import json
from pathlib import Path

from .harness import DESIGN_EXP_PER_S, Ceilings, Work

ROOT = Path(__file__).resolve().parents[1]
COPY_BPS = 3.0e12  # DESIGN §6, measured copy
BF16_FLOPS = 989e12  # DESIGN §6
TF32_FLOPS = 494.7e12  # H100 SXM datasheet, dense
LAUNCH_S = 3e-6
# dots a table-pass precision runs, and their rate (triton_kernels/table.py)
DOT_COST = {"tf32": (1, TF32_FLOPS), "tf32x3": (3, TF32_FLOPS), "bf16x3": (3, BF16_FLOPS), "ieee": (1, BF16_FLOPS)}
DESIGN_CEILINGS = Ceilings(copy_bytes_per_s=COPY_BPS, matmul_flops_per_s=BF16_FLOPS, matmul_dtype="bfloat16",
                           copy_bytes=0, matmul_n=0, exp_per_s=DESIGN_EXP_PER_S, datasheet_bf16_flops=BF16_FLOPS)

FSQ_D, FSQ_K = 33_280, 64_000  # DESIGN §6: video step, training path sample
IBQ_D, IBQ_K, IBQ_M = 4_096, 131_072, 256  # DESIGN §6: IBQ 1024² image step
BF16 = 2


def efficiency(kind: str, warps_per_sm: int) -> float:
    """Fraction of a rate reached with ``warps_per_sm`` resident warps (an assumption, stated):
    memory 0.90 from 16 warps (enough loads in flight), 0.75 from 8, else 0.5; tensor cores 0.70
    (Triton wgmma, one 8-warp block an SM); exp / ALU 1.0 from 16 warps, 0.75 from 8, else 0.5."""
    if kind == "tensor":
        return 0.70
    if kind == "memory":
        return 0.90 if warps_per_sm >= 16 else 0.75 if warps_per_sm >= 8 else 0.5
    return 1.0 if warps_per_sm >= 16 else 0.75 if warps_per_sm >= 8 else 0.5


def _time(terms: dict, blocks: int, warps: int) -> tuple[float, str]:
    """(seconds, binding term) of {"memory": bytes, "tensor": (flops, rate), "exp": count}."""
    secs = {}
    if terms.get("memory"):
        secs["memory"] = terms["memory"] / (COPY_BPS * efficiency("memory", blocks * warps))
    if terms.get("tensor"):
        flops, rate = terms["tensor"]
        secs["tensor"] = flops / (rate * efficiency("tensor", blocks * warps))
    if terms.get("exp"):
        secs["exp"] = terms["exp"] / (DESIGN_EXP_PER_S * efficiency("exp", blocks * warps))
    bound = max(secs, key=secs.get)
    total = max(secs.values()) if blocks >= 2 else sum(secs.values())
    return total + LAUNCH_S, bound if blocks >= 2 else "+".join(secs)


def _report(report: dict | None) -> dict:
    if report is not None:
        return report
    found = sorted((ROOT / "benchmarks" / "results").glob("compile_report-sm90a-*.json"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError("no benchmarks/results/compile_report-sm90a-*.json: run "
                                "python -m ursa_engine.benchmarks.compile_report --write")
    return json.loads(found[-1].read_text())


def _find(report: dict, kernel: str, variant: str = "") -> dict:
    for r in report["rows"]:
        if r["kernel"] == kernel and r["variant"] == variant:
            return r
    raise KeyError(f"{kernel}[{variant}] is not in the compile report")


def _floor(work: Work) -> float:
    return work.floor(DESIGN_CEILINGS)[0] * 1e-3


def _step_bytes(tokens: int, K: int, guided: bool = True) -> float:
    """:func:`.common.step_bytes` for bf16 logits (every logit read once, x read and written)."""
    return (2 if guided else 1) * tokens * K * BF16 + 2 * 8 * tokens


def predicted_rows(report: dict | None = None) -> list[dict]:
    """Predicted time and floor of each sampler kernel at the DESIGN §6 cases (module docstring)."""
    rep = _report(report)
    rows = []

    def add(kernel, variant, case, suite, terms, floor_work, note="", provider="triton", parts=None):
        parts = parts or [(kernel, variant)]
        comp = [_find(rep, k, v) for k, v in parts]
        r0 = comp[0]
        secs, bound = _time(terms, r0["blocks_per_sm"], r0["num_warps"])
        rows.append(dict(kernel=kernel + (f" [{variant}]" if variant else ""), case=case, suite=suite,
                         provider=provider, predicted_s=secs, floor_s=_floor(floor_work), bound=bound,
                         blocks_per_sm=r0["blocks_per_sm"], registers=r0["registers"],
                         spill_bytes=sum(c["spill_store_bytes"] + c["spill_load_bytes"] for c in comp), note=note))

    D, K = FSQ_D, FSQ_K
    pairs = float(D) * K  # (token, code) pairs of the FSQ pass: one exp2 each (every token moves: randn logits)
    add("metric_step_fsq_kernel", "guided", "fsq-video-33280", "metric_step",
        dict(memory=_step_bytes(D, K), exp=pairs), Work(bytes=_step_bytes(D, K)),
        "draw streams 8.5 GB; the codebook pass (2.1 G exp) overlaps it at 2 blocks/SM")
    add("metric_step_fsq_kernel", "unguided", "fsq-video-33280-unguided", "metric_step",
        dict(memory=_step_bytes(D, K, False), exp=pairs), Work(bytes=_step_bytes(D, K, False)),
        "no bench case (guidance is truncated late in sampling)")
    add("metric_sample_fsq_kernel", "", "fsq-train-33280", "metric_sample",
        dict(memory=20.0 * D, exp=pairs), Work(bytes=20.0 * D, exps=pairs), "arithmetic only: one codebook pass")
    for kind in ("mixture", "mask"):
        n = K if kind == "mixture" else K + 1
        add("uniform_step_kernel", kind, f"{kind}-video-33280", "mixture_step",
            dict(memory=_step_bytes(D, n)), Work(bytes=_step_bytes(D, n)),
            "upper bound: every token reads its logits (only the jumping ones do)")
    add("uniform_path_sample_kernel", "mixture", "mixture-train-33280-x8", "metric_sample",
        dict(memory=20.0 * D * 8), Work(bytes=20.0 * D * 8), "launch-bound")
    # IBQ table step: draw (memory) of group g+1 runs while the pass (tensor cores, at the report's
    # DOT_PRECISION) of group g runs; G = 4 groups. Pass at 1 block/SM: its exp epilogue serializes.
    Di, Ki, m = IBQ_D, IBQ_K, IBQ_M
    draw_s, _ = _time(dict(memory=_step_bytes(Di, Ki)), _find(rep, "draw_kernel")["blocks_per_sm"],
                      _find(rep, "draw_kernel")["num_warps"])
    p = _find(rep, "table_pass_kernel", "step")
    prec = p["config"].get("DOT_PRECISION", "bf16x3")

    def pass_time(precision):
        dots, rate = DOT_COST[precision]
        return _time(dict(tensor=(dots * 2.0 * Di * Ki * m, rate), exp=float(Di) * Ki), p["blocks_per_sm"],
                     p["num_warps"])[0]

    pass_s, tf32_s = pass_time(prec), pass_time("tf32")
    groups = 4
    total = max(draw_s, pass_s) + min(draw_s, pass_s) / groups + LAUNCH_S
    floor_work = Work(bytes=_step_bytes(Di, Ki), flops=2.0 * Di * Ki * m)
    comp = [_find(rep, "draw_kernel"), p, _find(rep, "table_finish_kernel", "step")]
    rows.append(dict(kernel="draw + table_pass + table_finish", case="ibq-image-4096", suite="metric_step",
                     provider="triton", predicted_s=total, floor_s=_floor(floor_work),
                     bound=f"tensor ({prec})" if pass_s > draw_s else "memory",
                     blocks_per_sm=p["blocks_per_sm"], registers=p["registers"],
                     spill_bytes=sum(c["spill_store_bytes"] + c["spill_load_bytes"] for c in comp),
                     note=f"fp32 table, {prec} pass {pass_s * 1e3:.2f} ms (tf32: {tf32_s * 1e3:.2f} ms), "
                          f"draw {draw_s * 1e3:.2f} ms, 4 groups pipelined"))
    # native CUDA, IBQ table mode (finding 6): a block a token re-reads the whole (K, m) float32 table
    try:
        nat = _find(rep, "cuda:metric_step_kernel", "bf16,table")
    except KeyError:
        nat = None
    if nat is not None:
        table_bytes = float(Di) * Ki * m * 4  # every moving token streams the 128 MiB table
        rows.append(dict(kernel="cuda:metric_step_kernel [bf16,table]", case="ibq-image-4096", suite="metric_step",
                         provider="native", predicted_s=table_bytes / COPY_BPS + _step_bytes(Di, Ki) / COPY_BPS,
                         floor_s=_floor(floor_work), bound="memory (table re-read a token)",
                         blocks_per_sm=nat["blocks_per_sm"], registers=nat["registers"],
                         spill_bytes=nat["spill_store_bytes"] + nat["spill_load_bytes"],
                         note="550 GB of table reads a step from DRAM (the table exceeds the 50 MB L2); "
                              "~0.1 s if L2 serves the blocks sweeping it in step"))
    rows += linear_ce_rows(rep)
    return rows


# fused linear cross-entropy (issue 18): the 1.7B training step of DESIGN §6
LCE_N, LCE_H, LCE_K = 33_280, 2_048, 64_000
HBM_BPS = 3.35e12  # H100 SXM datasheet HBM3 (the kernel docstring's backward figure only)
# per the kernel docstring (triton_kernels/linear_ce.py), when the compile report predates the kernels
LCE_DOCSTRING = {"linear_ce_fwd_kernel": (156, 1, 8), "linear_ce_dh_kernel": (242, 1, 8),
                 "linear_ce_dw_kernel": (247, 1, 8)}  # registers, blocks / SM, warps


def _lce_kernel(rep: dict, kernel: str) -> dict:
    try:
        return _find(rep, kernel, "train-1.7b")
    except KeyError:
        regs, blocks, warps = LCE_DOCSTRING[kernel]
        return dict(registers=regs, blocks_per_sm=blocks, num_warps=warps, spill_store_bytes=0, spill_load_bytes=0,
                    source="kernel docstring")


def linear_ce_rows(rep: dict) -> list[dict]:
    """Fused linear cross-entropy at n = 33,280, H = 2,048, K = 64,000 bf16 (``bench_linear_ce`` gpu case).

    The kernel docstring's model (``triton_kernels/linear_ce.py``), at this module's rates:

    * forward (``triton-forward``): 2·nHK = 8.72 TFLOP on the tensor cores at 0.70 of 989 TFLOP/s
      (Triton wgmma, one block an SM): ~12.6 ms (docstring: ~12.5 ms);
    * backward, each of the dh and dW kernels: max(tensor 2 × 8.72 TFLOP — recompute + product —,
      the fp32 accumulators read and written once a swept tile: 136 GB) — the docstring overlaps the two
      inside a kernel — plus zeroing / scaling / casting the fp32 gradients (3.6 GB). The accumulator
      traffic binds: 2 × 45 ms at the 3.0 TB/s copy rate used throughout this module (the docstring's
      ~80 ms uses the 3.35 TB/s datasheet HBM rate);
    * ``triton`` row: forward + backward; ``dense`` row: cuBLAS logits and the two gradient GEMMs
      (3 × 8.72 TFLOP at 0.70) plus four passes over the 4.3 GB of bf16 logits (docstring: ≈ 42 ms).

    Floors: the FLOPs at 989 TFLOP/s (DESIGN §6): 2·nHK forward, 10·nHK fused forward + backward,
    6·nHK dense (:mod:`.bench_linear_ce`).
    """
    n, H, K = LCE_N, LCE_H, LCE_K
    gemm = 2.0 * n * H * K  # one (n, H) × (H, K) product
    tensor_rate = BF16_FLOPS * efficiency("tensor", 8)
    fwd, dh, dw = (_lce_kernel(rep, f"linear_ce_{k}_kernel") for k in ("fwd", "dh", "dw"))
    fwd_s = gemm / tensor_rate + LAUNCH_S
    accum = {"dh": (n / 64) * (K / 256) * 2 * 64 * H * 4, "dw": (K / 64) * (n / 256) * 2 * 64 * H * 4}
    kernel_s = {k: max(2 * gemm / tensor_rate, b / COPY_BPS) + LAUNCH_S for k, b in accum.items()}
    grads = (n + K) * H * 4.0  # fp32 d(hidden) + d(weight) bytes
    epilogue_s = 4.5 * grads / COPY_BPS + 4 * LAUNCH_S  # zero (1×), scale (2×), cast to bf16 (1.5×)
    bwd_s = sum(kernel_s.values()) + epilogue_s
    logits = n * K * BF16
    dense_s = 3 * gemm / tensor_rate + 4 * logits / COPY_BPS + 6 * LAUNCH_S
    spills = sum(c["spill_store_bytes"] + c["spill_load_bytes"] for c in (fwd, dh, dw))
    src = "" if "source" not in fwd else " (registers / blocks per SM: kernel docstring; no compile report rows)"
    case = "train-1.7b-33280"
    return [
        dict(kernel="linear_ce_fwd_kernel", case=case, suite="linear_ce", provider="triton-forward",
             predicted_s=fwd_s, floor_s=_floor(Work(flops=gemm)), bound="tensor",
             blocks_per_sm=fwd["blocks_per_sm"], registers=fwd["registers"],
             spill_bytes=fwd["spill_store_bytes"] + fwd["spill_load_bytes"],
             note="8.72 TFLOP at 0.70 of 989 TFLOP/s" + src),
        dict(kernel="linear_ce fwd + dh + dW", case=case, suite="linear_ce", provider="triton",
             predicted_s=fwd_s + bwd_s, floor_s=_floor(Work(flops=5 * gemm)), bound="memory (fp32 accumulators)",
             blocks_per_sm=dh["blocks_per_sm"], registers=max(dh["registers"], dw["registers"]), spill_bytes=spills,
             note=f"forward {fwd_s * 1e3:.1f} ms + backward {bwd_s * 1e3:.1f} ms (dh {kernel_s['dh'] * 1e3:.1f}, "
                  f"dW {kernel_s['dw'] * 1e3:.1f}: 136 GB of accumulator traffic each; epilogue "
                  f"{epilogue_s * 1e3:.1f}); at the 3.35 TB/s datasheet HBM rate the backward would be "
                  f"{(sum(accum.values()) + grads * 4.5) / HBM_BPS * 1e3:.0f} ms" + src),
        dict(kernel="dense logits + F.cross_entropy (cuBLAS)", case=case, suite="linear_ce", provider="dense",
             predicted_s=dense_s, floor_s=_floor(Work(flops=3 * gemm)), bound="tensor",
             blocks_per_sm="–", registers="–", spill_bytes="–",
             note="3 GEMMs at 0.70 of 989 TFLOP/s + 4 passes over 4.3 GB of bf16 logits"),
    ]


def compare(records: list[dict], rows: list[dict] | None = None) -> list[dict]:
    """Measured (benchmark records) against predicted, paired on (suite, case, provider)."""
    rows = rows if rows is not None else predicted_rows()
    by_key = {(r["suite"], r["case"], r["provider"]): r for r in rows}
    out = []
    for rec in records:
        row = by_key.get((rec.get("suite"), rec.get("case"), rec.get("provider")))
        ms = rec.get("median_ms")
        if row is None or rec.get("status") != "ok" or not ms:
            continue
        measured = ms * 1e-3
        out.append(dict(kernel=row["kernel"], suite=row["suite"], case=row["case"], provider=row["provider"],
                        measured_s=measured, predicted_s=row["predicted_s"], ratio=measured / row["predicted_s"],
                        floor_s=row["floor_s"], measured_over_floor=measured / row["floor_s"]))
    return out


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def markdown(rows: list[dict] | None = None) -> str:
    """The README table: kernel, case, registers, spills, blocks/SM, predicted, floor, predicted/floor."""
    rows = rows if rows is not None else predicted_rows()
    lines = ["| kernel | case | registers | spills (B) | blocks/SM | predicted | floor | predicted/floor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['case']} | {r['registers']} | {r['spill_bytes']} | {r['blocks_per_sm']} "
                     f"| {_ms(r['predicted_s'])} | {_ms(r['floor_s'])} | {r['predicted_s'] / r['floor_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
