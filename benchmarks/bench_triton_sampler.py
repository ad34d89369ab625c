"""Tuning sweep of the Triton sampler kernels at the real sizes of docs/design.md §6 (GPU only).

The per-op benchmarks (``bench_metric_step`` & co., run by :mod:`ursa_engine.benchmarks.gpu_suite`) time the
default configuration against the dense reference. This script times *candidate tilings* of the
Triton kernels, each against its floor, so the defaults in :mod:`ursa_engine.triton_kernels.sampler` can be
set from measurements::

    PYTHONUNBUFFERED=1 python3 -m ursa_engine.benchmarks.bench_triton_sampler --out "$OUT" [--budget 420]

Cases: FSQ video step (2 × 33,280 tokens' bf16 logits, K = 64,000, guidance 7), the same step
late in sampling (x̂1 = x for 90% of tokens: the codebook pass is skipped), IBQ image step
(2 × 4,096 × 131,072 bf16 logits, m = 256; float32 table = bf16x3 dot, three bf16 products,
~1e-5 distance error; bfloat16 table = bf16 dot), the training sampler (33,280 × 64,000). Each
row: median ms, floor ms and ratio
(floor = bytes / measured copy bandwidth, max'ed with FLOPs / measured bf16 matmul rate),
extra peak memory. Output: ``sweep.json`` and ``sweep.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from .harness import Deadline, measure, measure_ceilings, peak_memory

FSQ_LEVELS = (8, 8, 8, 5, 5, 5)

FSQ_STEP_CONFIGS = [
    {},  # the defaults
    {"ROWS": 2},
    {"ROWS": 8},
    {"FW": 2},
    {"CH_MAX": 256, "FW": 4},
    {"CHUNKS": 128, "W": 32},
    {"W": 8},
    {"STAGES": 2},
    {"STAGES": 4},
    {"DRAW_ROWS": 4},
    {"step": {"num_warps": 4}},
    {"ROWS": 2, "step": {"num_warps": 4}},
]
IBQ_STEP_CONFIGS = [
    {},
    {"BN": 128},
    {"BM": 64},
    {"BM": 64, "pass": {"num_warps": 4}},
    {"pass": {"num_stages": 2}},
    {"pass": {"num_stages": 4}},
    {"CHUNKS": 256, "W": 32},
    {"finish": {"num_warps": 8}},
]
SAMPLE_CONFIGS = [
    {},
    {"ROWS": 2},
    {"ROWS": 8},
    {"FW": 2},
    {"CH_MAX": 256, "FW": 4},
    {"sample": {"num_warps": 4}},
    {"ROWS": 8, "sample": {"num_warps": 4}},
]


def _params(device, h=0.02, beta=5.0, beta_dot=20.0, rate=1.0):
    return torch.tensor([h, beta, beta_dot, rate], dtype=torch.float32, device=device)


def _fsq_step_inputs(device, gen, D, K, late=False):
    cond = torch.randn(D, K, generator=gen, device=device, dtype=torch.bfloat16) * 3
    uncond = torch.randn(D, K, generator=gen, device=device, dtype=torch.bfloat16) * 3
    x = torch.randint(0, K, (D,), generator=gen, device=device)
    if late:  # x̂1 = x for ~90% of tokens: a sharp peak on the current token
        sharp = torch.rand(D, generator=gen, device=device) < 0.9
        rows = torch.nonzero(sharp).squeeze(-1)
        cond[rows, x[rows]] = 60.0
        uncond[rows, x[rows]] = 60.0
    return cond, uncond, x


def run(out_dir: Path, budget_s: float, quick: bool, smoke: bool = False) -> dict:
    """``smoke``: tiny sizes on the CPU under TRITON_INTERPRET=1, to check the script itself."""
    from ursa_engine.triton_kernels import sampler as tks

    from ursa_engine.codebook import Codebook
    from ursa_engine.reference.rng import seeds_per_row

    device = torch.device("cpu" if smoke else "cuda")
    sizes = dict(levels=(4, 3, 5, 2), fsq_D=64, ibq_K=97, ibq_m=32, ibq_D=64) if smoke else dict(
        levels=FSQ_LEVELS, fsq_D=33_280, ibq_K=131_072, ibq_m=256, ibq_D=4_096)
    deadline = Deadline(budget_s)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(time.time()))
    ceil = measure_ceilings(device, "smoke" if smoke else "gpu")
    bw, mm = ceil.copy_bytes_per_s, ceil.matmul_flops_per_s
    report = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(device),
              "copy_GBps": bw / 1e9, "bf16_TFLOPs": mm / 1e12,
              "commit": os.environ.get("URSA_COMMIT", ""), "rows": []}
    print(f"# {report['device']}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)

    def sweep(case, configs, make_fn, floor_ms, share):
        stop = Deadline(min(deadline.left(), share * budget_s))
        best = None
        for cfg in configs[:3] if quick else configs:
            if stop.expired(margin=5) or deadline.expired(margin=10):
                print(f"{case}: out of time, skipped {cfg}", flush=True)
                continue
            row = {"case": case, "config": cfg, "floor_ms": floor_ms}
            try:
                fn = make_fn(cfg)
                t = measure(fn, device, warmup=2, reps=15, budget_s=1.5)
                _, extra = peak_memory(fn, device)
                row.update(median_ms=t.median_ms, min_ms=t.min_ms, ratio_to_floor=t.median_ms / floor_ms,
                           extra_bytes=extra, status="ok")
                if best is None or t.median_ms < best["median_ms"]:
                    best = row
            except Exception as err:  # noqa: BLE001 - a failing tiling is a result, not a crash
                row.update(status="error", error=f"{type(err).__name__}: {err}"[:400])
                traceback.print_exc()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            if not smoke:
                torch.cuda.empty_cache()
        if best is not None:
            print(f"BEST {case}: {best['config']} {best['median_ms']:.3f} ms = {best['ratio_to_floor']:.2f}x floor",
                  flush=True)
        return best

    # ---- FSQ video step (and late in sampling)
    cb = Codebook.fsq(sizes["levels"])
    K, D = cb.size, sizes["fsq_D"]
    table = cb.normalized_on(device)
    seeds, row_len = seeds_per_row(0, (D,), device)
    p, st = _params(device), torch.tensor([25], device=device)
    floor_fsq = (2 * D * K * 2 + 2 * D * 8) / bw * 1e3
    for late in (False, True):
        cond, uncond, x = _fsq_step_inputs(device, gen, D, K, late=late)
        out = torch.empty_like(x)

        def make(cfg, cond=cond, uncond=uncond, x=x, out=out):
            def fn(i):
                tks._metric_step(cond, uncond, x, table, p, st, seeds=seeds, row_len=row_len, guidance_scale=7.0,
                                 temperature=1.0, top_k=0, top_p=1.0, power=2, levels=cb.levels, last=False,
                                 argmax_last=False, out=out, cfg=cfg)
            return fn

        name = "fsq-video-step-late" if late else "fsq-video-step"
        report[f"best_{name}"] = sweep(name, FSQ_STEP_CONFIGS[:4] if late else FSQ_STEP_CONFIGS, make,
                                       floor_fsq, 0.15 if late else 0.35)
        del cond, uncond, x, out

    # ---- IBQ image step (float32 table: bf16x3 dot; bfloat16 table: bf16 dot)
    K, D, m = sizes["ibq_K"], sizes["ibq_D"], sizes["ibq_m"]
    emb = torch.randn(K, m, generator=gen, device=device)
    table32 = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    seeds, row_len = seeds_per_row(0, (D,), device)
    cond, uncond, x = _fsq_step_inputs(device, gen, D, K)
    floor_ibq = max((2 * D * K * 2) / bw, 2 * D * K * m / mm) * 1e3
    for tdt in (torch.float32, torch.bfloat16):
        tab = table32.to(tdt)

        def make(cfg, tab=tab, cond=cond, uncond=uncond, x=x):
            def fn(i):
                tks._metric_step(cond, uncond, x, tab, p, st, seeds=seeds, row_len=row_len, guidance_scale=7.0,
                                 temperature=1.0, top_k=0, top_p=1.0, power=2, levels=None, last=False,
                                 argmax_last=False, out=None, cfg=cfg)
            return fn

        name = f"ibq-image-step-{str(tdt).replace('torch.', '')}-table"
        report[f"best_{name}"] = sweep(name, IBQ_STEP_CONFIGS, make, floor_ibq, 0.15)
    del cond, uncond, x, emb, table32

    # ---- training sampler (FSQ, 33,280 × 64,000, a β per token)
    cb = Codebook.fsq(sizes["levels"])
    K, D = cb.size, sizes["fsq_D"]
    table = cb.normalized_on(device)
    seeds, row_len = seeds_per_row(0, (D,), device)
    x1 = torch.randint(0, K, (D,), generator=gen, device=device)
    beta = torch.rand(D, generator=gen, device=device) * 40
    floor_exp = D * K / (ceil.exp_per_s or 2.1e12) * 1e3  # DESIGN §6's modelled exp rate

    def make_sample(cfg):
        def fn(i):
            tks._metric_sample(x1, beta, table, power=2, levels=cb.levels, seeds=seeds, row_len=row_len, out=None,
                               cfg=cfg)
        return fn

    report["best_train-sample"] = sweep("train-sample", SAMPLE_CONFIGS, make_sample, floor_exp, 0.2)

    lines = ["| case | config | median ms | floor ms | ratio | extra MiB |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("status") == "ok":
            lines.append(f"| {r['case']} | `{json.dumps(r['config'])}` | {r['median_ms']:.3f} | {r['floor_ms']:.3f} | "
                         f"{r['ratio_to_floor']:.2f} | {(r['extra_bytes'] or 0) / 2**20:.1f} |")
        else:
            lines.append(f"| {r['case']} | `{json.dumps(r['config'])}` | error | | | {r.get('error', '')[:80]} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    from .provenance import write_text  # atomic: an interrupted sweep leaves no half-written result

    write_text(out_dir / "sweep.json", json.dumps(report, indent=1))
    write_text(out_dir / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole sweep")
    ap.add_argument("--quick", action="store_true", help="three configurations a case")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_triton_sampler: needs a CUDA device (or --smoke)")
    run(Path(args.out), args.budget, args.quick, smoke=args.smoke)


if __name__ == "__main__":
    main()
