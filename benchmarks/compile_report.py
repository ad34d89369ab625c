"""Compile report for sm_90a, no GPU needed (issue 12): registers, spills, shared memory, occupancy.

Every Triton kernel of :mod:`ursa_engine.triton_kernels` is lowered by Triton's compiler for
``GPUTarget("cuda", 90, 32)`` at the configuration its launcher picks for the DESIGN §6 cases (the
launchers' own config functions, :data:`~ursa_engine.triton_kernels.tiles.LAUNCH` and
:func:`~ursa_engine.triton_kernels.tiles.fsq_step_tiles` & co., with an H100's 132 SMs), then
assembled by the ptxas in Triton's wheel with ``-v`` (:mod:`.compile_head_draw`). Every CUDA kernel
of ``csrc/cuda`` is compiled with ``nvcc -Xptxas -v -arch=sm_90a`` (:mod:`.compile_cuda`).

One row a kernel variant: ``kernel, case, config, registers, spill_store_bytes, spill_load_bytes,
stack_frame_bytes, shared_bytes, num_warps, blocks_per_sm, limit`` (which resource bounds the
blocks), and ``claimed`` (blocks an SM the kernel is built for: :data:`CLAIMED_BLOCKS_PER_SM`, the
one table of the occupancy claims of the kernels' docstrings) and ``hot`` (a kernel of the timed
sampler / model path). No kernel may spill, hot or not (issue 20); a stack frame (ptxas's "bytes
stack frame": local memory a thread uses, spills or local arrays) must be zero or within
:data:`STACK_FRAME_BYTES_MAX`. Blocks an SM on an H100 (sm_90): :func:`blocks_per_sm`.

    python -m ursa_engine.benchmarks.compile_report [--json PATH] [--markdown]

Runs without ``TRITON_INTERPRET`` (cleared before Triton loads: the kernels must be JIT functions).
Writes ``benchmarks/results/compile_report-sm90a-<commit>.json`` with ``--write``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# H100 SXM (sm_90) per SM: registers, shared memory (228 KB, of which 1 KB is reserved per block;
# at most 227 KB a block), warps and blocks. Registers are allocated per warp in units of 256.
H100 = dict(sms=132, regs=65_536, smem=228 * 1024, smem_block_max=227 * 1024, smem_reserved=1024, warps=64,
            blocks=32, reg_unit=256, max_regs=255)

# DESIGN §6 cases: the FSQ video step / training path sample and the IBQ 1024² image step.
FSQ_LEVELS = (8, 8, 8, 5, 5, 5)  # K = 64,000
CASES = {
    "fsq-video": dict(D=33_280, K=64_000, levels=FSQ_LEVELS),
    "ibq-1024": dict(D=4_096, K=131_072, m=256),
    "model-1.7b": dict(D=33_601, H=2_048, I=6_144, Hq=16, Hkv=8, head_dim=128),
    "train-1.7b": dict(n=33_280, H=2_048, K=64_000),  # one video sample's latent tokens: the fused CE
}

# Blocks an SM each kernel is built for (its docstring's claim); the test fails below it.
# metric_step FSQ: 2 (maxnreg 128 at 8 warps: one block streams logits while the other does
# codebook arithmetic, metric_step.py); metric_sample FSQ: 4 (4 warps at 128). Draws: 2 (8 warps,
# ≤ 128 registers). head_draw pass one: 1 (one 256-thread CTA an SM, head_draw.py). The CUDA
# kernels (256 threads, csrc/cuda/sampler.cu): 2 for the per-token blocks (≤ 128 registers).
CLAIMED_BLOCKS_PER_SM = {
    "metric_step_fsq_kernel": 2,
    "metric_sample_fsq_kernel": 4,
    "uniform_step_kernel": 2,
    "draw_kernel": 2,
    "table_pass_kernel": 1,
    "table_finish_kernel": 2,
    "uniform_path_sample_kernel": 4,
    "head_stats_kernel": 1,
    "head_select_kernel": 4,
    "head_finish_kernel": 1,
    "linear_ce_fwd_kernel": 1,  # fused linear CE (linear_ce.py): one 256-thread CTA an SM, registers bound
    "linear_ce_dh_kernel": 1,
    "linear_ce_dw_kernel": 1,
    "_rms_norm_kernel": 4,
    "_swiglu_kernel": 4,
    "_qk_norm_rope_kernel": 4,
    "cuda:metric_step_kernel": 2,
    "cuda:token_step_kernel": 2,
    "cuda:metric_sample_kernel": 2,
    "cuda:kappa_sample_kernel": 4,
}


# Stack frame bytes a thread a kernel may use (ptxas -v "bytes stack frame"): 0 for every kernel
# not listed here. An entry needs the reason its local memory is there and is harmless.
STACK_FRAME_BYTES_MAX: dict[str, int] = {}


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int) -> tuple[int, str]:
    """Resident blocks an SM on an H100 and the resource that bounds them ("regs", "smem", "warps", "blocks")."""
    per_warp = math.ceil(max(registers, 1) * 32 / H100["reg_unit"]) * H100["reg_unit"]
    limits = {
        "regs": (H100["regs"] // per_warp) // num_warps,
        "smem": (H100["smem"] // (shared_bytes + H100["smem_reserved"])) if shared_bytes else H100["blocks"],
        "warps": H100["warps"] // num_warps,
        "blocks": H100["blocks"],
    }
    if shared_bytes > H100["smem_block_max"]:
        limits["smem"] = 0
    which = min(limits, key=lambda k: limits[k])
    return limits[which], which


def _row(r: dict, case: str, hot: bool, label: str | None = None) -> dict:
    blocks, limit = blocks_per_sm(r["registers"] or 255, r["num_warps"], r["shared_bytes"])
    kernel = r["kernel"]
    return dict(kernel=kernel, variant=label or "", case=case, hot=hot, config=r.get("config", {}),
                num_warps=r["num_warps"], num_stages=r.get("num_stages"), maxnreg=r.get("maxnreg"),
                registers=r["registers"], spill_store_bytes=r["spill_store_bytes"],
                spill_load_bytes=r["spill_load_bytes"], stack_frame_bytes=r.get("stack_frame_bytes"),
                shared_bytes=r["shared_bytes"], blocks_per_sm=blocks,
                limit=limit, claimed=CLAIMED_BLOCKS_PER_SM.get(kernel))


# ----------------------------------------------------------------------------- Triton kernels
def _types(fn, constexprs: dict, ptrs: dict, values: dict) -> dict:
    """name -> (Triton type, sample value) of the runtime arguments of ``fn``: pointers default to
    ``*i64`` (token ids) unless ``ptrs`` says otherwise; ``values`` gives sample ints / floats
    (floats are fp32, ints i32; a value divisible by 16 gets Triton's divisibility hint)."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            out[name] = (ptrs.get(name, "*i64"), 0)
        else:
            v = values.get(name, 1)
            out[name] = ("fp32" if isinstance(v, float) else "i32", v)
    return out


def _triton(fn, case, ptrs, values, constexprs, opts, hot, label=""):
    from .compile_head_draw import compile_kernel

    r = compile_kernel(fn, _types(fn, constexprs, ptrs, values), constexprs, opts.get("num_warps", 4),
                       opts.get("num_stages", 3), maxnreg=opts.get("maxnreg"))
    r["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in constexprs.items()}
    r["maxnreg"] = opts.get("maxnreg")
    return _row(r, case, hot, label)


def sampler_rows(quick: bool = False) -> list[dict]:
    """The sampler kernels at the DESIGN §6 cases (bf16 logits with guidance unless the label says)."""
    import torch
    from ursa_engine.triton_kernels import categorical, metric_sample, metric_step, mixture_mask, table
    from ursa_engine.triton_kernels import tiles as S

    cuda = torch.device("cuda")
    rows = []
    fv, ib = CASES["fsq-video"], CASES["ibq-1024"]
    D, K = fv["D"], fv["K"]
    logit_ptrs = dict(cond_ptr="*bf16", uncond_ptr="*bf16", params_ptr="*fp32", error_ptr="*i32")
    scalars = dict(row_len=D, index_offset=0, D=D, K=K, stride_c=K, stride_u=K, gs=7.0, zs=1.4426950408889634)
    # metric step, FSQ: guided, unguided, guided with in-kernel validation (HAS_ERROR)
    opts = S.launch_options("metric_step_fsq")
    variants = [("guided", dict(HAS_UNCOND=True)), ("unguided", dict(HAS_UNCOND=False))]
    if not quick:  # in-kernel validation; x̂1 given (fused lm_head draw): no logits read
        variants += [("guided+error", dict(HAS_UNCOND=True, HAS_ERROR=True)), ("x1", dict(HAS_X1=True))]
    for label, flags in variants:
        flags = dict(dict(HAS_UNCOND=False, HAS_X1=False, HAS_ERROR=False), **flags)
        tiles = S.fsq_step_tiles(FSQ_LEVELS, K, D, cuda, guided=flags["HAS_UNCOND"])
        rows.append(_triton(metric_step.metric_step_fsq_kernel, "fsq-video", logit_ptrs, scalars,
                            dict(POWER=2, LAST=False, ARGMAX=False, **flags, **tiles), opts, True, label))
    # metric path sample, FSQ (training)
    st = S.fsq_sample_tiles(FSQ_LEVELS, D, cuda)
    rows.append(_triton(metric_sample.metric_sample_fsq_kernel, "fsq-video", dict(beta_ptr="*fp32"),
                        dict(row_len=D, index_offset=0, D=D), dict(POWER=2, **st),
                        S.launch_options("metric_sample_fsq"), True))
    # mixture / mask steps
    dc = S.draw_config(K, D, cuda)
    for label, mask in (("mixture", False), ("mask", True)):
        rows.append(_triton(mixture_mask.uniform_step_kernel, "fsq-video", logit_ptrs, dict(scalars, mask_id=K - 1),
                            dict(MASK=mask, HAS_UNCOND=True, HAS_X1=False, HAS_ERROR=False, LAST=False, ARGMAX=False,
                                 **dc), S.launch_options("uniform_step"), True, label))
    rows.append(_triton(mixture_mask.uniform_path_sample_kernel, "fsq-video", dict(keep_ptr="*fp32"),
                        dict(row_len=D, index_offset=0, D=D, K=K, mask_id=0),
                        dict(MASK=False, BLOCK=S.path_block(D, cuda, H100["sms"])),
                        S.launch_options("uniform_path_sample"), False, "mixture"))
    # IBQ table step: draw (a pipeline group), tensor-core pass, finish; path sample: pass + finish
    D2, K2, m = ib["D"], ib["K"], ib["m"]
    bounds = S.table_groups(D2, cuda)
    n = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    dc2 = S.draw_config(K2, n, cuda)
    rows.append(_triton(categorical.draw_kernel, "ibq-1024", dict(logit_ptrs, count_ptr="*i32"),
                        dict(scalars, row_len=D2, D=D2, K=K2, stride_c=K2, stride_u=K2, row0=0),
                        dict(HAS_UNCOND=True, HAS_X1=False, HAS_ERROR=False, LAST=False, ARGMAX=False, **dc2),
                        S.launch_options("draw"), True))
    tptr = dict(table_ptr="*fp32", sqc_ptr="*fp32", beta_ptr="*fp32", params_ptr="*fp32", ts_ptr="*fp32",
                zp_ptr="*fp32", count_ptr="*i32")
    for label, rates, d_tok in (("step", True, n), ("sample", False, D2)):
        c = S.table_config(d_tok, K2, m, cuda, torch.float32, num_sms=H100["sms"])
        rows.append(_triton(table.table_pass_kernel, "ibq-1024", tptr,
                            dict(D=d_tok, K=K2, m=m, NT=c["NT"], SPLITS=c["SPLITS"]),
                            dict(TPS=c["TPS"], RATES=rates, POWER=2, BM=c["BM"], BN=c["BN"], M_P2=c["M_P2"],
                                 BKM=c["BKM"], DOT_PRECISION=c["DOT_PRECISION"]),
                            S.launch_options("table_pass"), True, label))
        if not quick:
            rows.append(_triton(table.table_finish_kernel, "ibq-1024", tptr,
                                dict(row_len=D2, index_offset=0, D=d_tok, K=K2, m=m, NT=c["NT"], SPLITS=c["SPLITS"]),
                                dict(RATES=rates, POWER=2, R=c["R"], NT_P2=S._pow2(c["NT"]),
                                     SP_P2=S._pow2(c["SPLITS"]), BN=c["BN"], M_P2=c["M_P2"], BKM=c["BKM"]),
                                S.launch_options("table_finish"), False, label))
    return rows


def model_rows() -> list[dict]:
    """The model's fused kernels (1.7B: hidden 2,048, intermediate 6,144, 16 / 8 heads of 128), bf16."""
    from ursa_engine.triton_kernels import qk_norm_rope, rmsnorm, swiglu

    mc = CASES["model-1.7b"]
    rows = []
    c = rmsnorm.rms_norm_config(mc["H"])
    rows.append(_triton(rmsnorm._rms_norm_kernel, "model-1.7b", dict(x_ptr="*bf16", r_ptr="*bf16", h_ptr="*bf16",
                                                                      w_ptr="*bf16", y_ptr="*bf16"),
                        dict(n_cols=mc["H"], stride_x=mc["H"], stride_r=mc["H"], stride_h=mc["H"], stride_y=mc["H"],
                             eps=1e-6), dict(HAS_RESIDUAL=True, BLOCK_N=c["BLOCK_N"]),
                        dict(num_warps=c["num_warps"]), True))
    c = swiglu.swiglu_config(mc["I"])
    rows.append(_triton(swiglu._swiglu_kernel, "model-1.7b", dict(g_ptr="*bf16", u_ptr="*bf16", o_ptr="*bf16"),
                        dict(n_cols=mc["I"], stride_g=2 * mc["I"], stride_u=2 * mc["I"], stride_o=mc["I"]),
                        dict(BLOCK=c["BLOCK"]), dict(num_warps=c["num_warps"]), True))
    c = qk_norm_rope.qk_norm_rope_config(mc["Hq"], mc["Hkv"], mc["head_dim"])
    hd, hq, hkv = mc["head_dim"], mc["Hq"], mc["Hkv"]
    ptrs = {f"{p}_ptr": "*bf16" for p in ("q", "k", "qo", "ko", "wq", "wk")}
    ptrs.update(cos_ptr="*fp32", sin_ptr="*fp32")
    qkv = (hq + 2 * hkv) * hd
    vals = dict(seq_len=mc["D"], n_q_heads=hq, n_kv_heads=hkv, sq_b=mc["D"] * qkv, sq_l=qkv, sq_h=hd,
                sk_b=mc["D"] * qkv, sk_l=qkv, sk_h=hd, sqo_b=mc["D"] * hq * hd, sqo_l=hq * hd, sqo_h=hd,
                sko_b=mc["D"] * hkv * hd, sko_l=hkv * hd, sko_h=hd, sc_b=0, sc_l=hd // 2, eps=1e-6)
    rows.append(_triton(qk_norm_rope._qk_norm_rope_kernel, "model-1.7b", ptrs, vals,
                        {k: v for k, v in c.items() if k != "num_warps"}, dict(num_warps=c["num_warps"]), True))
    return rows


def head_draw_rows() -> list[dict]:
    """The fused lm_head + draw kernels at the 1.7B video step (:func:`.compile_head_draw.report`): the draw,
    argmax, and their LOGPROB variants (x̂1 log-probabilities for rollouts, DESIGN §9)."""
    from .compile_head_draw import report, variant

    out = []
    for r in report(uncond=True, dtype="bf16", argmax=True, logprob=True):
        r["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.pop("constexprs").items()}
        r.pop("ptxas_log", None)
        out.append(_row(r, "fsq-video", r["kernel"] != "head_select_kernel", variant(r)))
    return out


def linear_ce_rows() -> list[dict]:
    """The fused linear cross-entropy (forward, dh, dW) at the 1.7B training case, bf16, z-loss and weights on."""
    import torch
    from ursa_engine.triton_kernels import linear_ce as lce

    tc = CASES["train-1.7b"]
    n, H, K = tc["n"], tc["H"], tc["K"]
    c = lce.linear_ce_config(n, K, H, torch.device("cuda"), torch.bfloat16)
    ptrs = dict(h_ptr="*bf16", w_ptr="*bf16", wt_ptr="*fp32", lse_ptr="*fp32", loss_ptr="*fp32", coef_ptr="*fp32",
                scale_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32")
    vals = dict(n=n, K=K, stride_h=H, stride_w=H, ignore_index=-100, inv_t=1.0, z_loss=1e-4)
    flags = dict(H=H, HAS_Z_LOSS=True, UPCAST=c["UPCAST"], DOT_PRECISION=c["DOT_PRECISION"], BLOCK_H=c["BLOCK_H"])
    back = dict(flags, LOGIT_DTYPE=c["LOGIT_DTYPE"])
    return [
        _triton(lce.linear_ce_fwd_kernel, "train-1.7b", ptrs, vals,
                dict(flags, HAS_WEIGHTS=True, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"]),
                dict(num_warps=c["fwd_warps"], num_stages=c["fwd_stages"]), True),
        _triton(lce.linear_ce_dh_kernel, "train-1.7b", ptrs, vals,
                dict(back, BLOCK_M=c["dh_BLOCK_M"], BLOCK_K=c["dh_BLOCK_K"]),
                dict(num_warps=c["dh_warps"], num_stages=c["dh_stages"]), True),
        _triton(lce.linear_ce_dw_kernel, "train-1.7b", ptrs, vals,
                dict(back, BLOCK_M=c["dw_BLOCK_M"], BLOCK_K=c["dw_BLOCK_K"]),
                dict(num_warps=c["dw_warps"], num_stages=c["dw_stages"]), True),
    ]


# ----------------------------------------------------------------------------- the whole report
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(quick: bool = False, cuda: bool = True) -> dict:
    """The whole report: ``{"target", "commit", "h100", "rows", "skipped"}``. ``quick``: fewer variants;
    ``cuda``: also nvcc on csrc/cuda (skipped, with the reason in ``skipped``, without nvcc)."""
    from . import compile_cuda

    os.environ["TRITON_INTERPRET"] = "0"
    t0 = time.time()
    rows, skipped = [], {}
    jobs, why = compile_cuda.start() if cuda else ([], None)  # nvcc runs while Triton compiles
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as err:  # noqa: BLE001 - no NVIDIA backend or ptxas: nothing Triton can be checked
        skipped["triton"] = f"no NVIDIA backend / ptxas in this Triton: {err}"
    else:
        rows += sampler_rows(quick) + head_draw_rows() + model_rows() + linear_ce_rows()
    if cuda:
        got, why = compile_cuda.cuda_rows(jobs) if not why else ([], why)
        if why:
            skipped["cuda"] = why
        rows += [_row(r, r.pop("case"), r.pop("hot"), r.pop("variant")) for r in got]
    return dict(target="sm_90a", commit=_commit(), h100=H100, seconds=round(time.time() - t0, 1), rows=rows,
                skipped=skipped)


def markdown(rows: list[dict]) -> str:
    """A compact table of the rows: kernel, case, registers, spills, shared memory, blocks an SM (claimed)."""
    lines = ["| kernel | case | warps | registers | spills (B) | shared (KB) | blocks/SM (claimed) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r["kernel"] + (f" [{r['variant']}]" if r["variant"] else "")
        spills = r["spill_store_bytes"] + r["spill_load_bytes"]
        lines.append(f"| {name} | {r['case']} | {r['num_warps']} | {r['registers']} | {spills} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['blocks_per_sm']} ({r['claimed']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from . import provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--write", action="store_true",
                    help="write benchmarks/results/compile_report-sm90a-<commit>.json")
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--no-cuda", action="store_true", help="skip nvcc on csrc/cuda")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    provenance.add_argument(ap)
    a = ap.parse_args(argv)
    try:
        stamp = provenance.check(allow_dirty=a.allow_dirty) if a.json or a.write else None
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    doc = report(quick=a.quick, cuda=not a.no_cuda)
    for r in doc["rows"]:
        print(f"{r['kernel']:28s} {r['variant']:14s} {r['case']:11s} warps {r['num_warps']:2d}: "
              f"{r['registers']} regs, {r['spill_store_bytes'] + r['spill_load_bytes']} B spills, "
              f"{r['stack_frame_bytes']} B stack, "
              f"{r['shared_bytes']} B smem -> {r['blocks_per_sm']} blocks/SM ({r['limit']}; claimed {r['claimed']})")
    for k, why in doc["skipped"].items():
        print(f"skipped {k}: {why}")
    if a.markdown:
        print(markdown(doc["rows"]))
    paths = [Path(a.json)] if a.json else []
    if a.write:
        paths.append(ROOT / "benchmarks" / "results" / f"compile_report-sm90a-{doc['commit']}.json")
    for p in paths:
        provenance.write_json(p, doc, stamp)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
