"""Compile report of the fused lm_head + x̂1 draw kernels (:mod:`ursa_engine.triton_kernels.head_draw`) for sm_90a.

No GPU needed: Triton's compiler lowers each kernel at the production configuration (bf16, H = 2,048,
K = 64,000, D = 33,280 tokens: the 1.7B video step, :func:`triton_kernels.head_draw.head_config`) for
``GPUTarget("cuda", 90, 32)``, then the ptxas bundled in Triton's wheel assembles the PTX for sm_90a
with ``-v``: registers a thread, spill bytes, and the shared memory the kernel needs (Triton's
metadata; ptxas reports only static shared memory).

    python benchmarks/compile_head_draw.py [--json out.json] [--no-uncond] [--argmax] [--logprob] [--block-m 128 ...]

Must run without ``TRITON_INTERPRET=1`` (the script clears it before Triton loads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# production sizes: 1.7B video step, 13×40×64 latent tokens, CFG (cond + uncond hidden states)
D, K, H = 33_280, 64_000, 2_048


def _attrs(fn, args: dict) -> dict:
    """Divisibility-by-16 hints like Triton's launcher gives: pointers (aligned) and ints that divide."""
    out = {}
    for name, (ty, value) in args.items():
        if ty.startswith("*") or (ty in ("i32", "i64") and value % 16 == 0):
            out[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return out


def _ptxas_report(ptx: str, capability: int = 90) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    arch = sm_arch_from_capability(capability)  # sm_90a: the wgmma / setmaxnreg features Triton uses
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else 0,
                spill_load_bytes=int(spill.group(2)) if spill else 0,
                stack_frame_bytes=int(stack.group(1)) if stack else 0,
                static_smem_bytes=int(smem.group(1)) if smem else 0,
                ptxas_log=log.strip())


def compile_kernel(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, capability: int = 90,
                   maxnreg: int | None = None) -> dict:
    """Lower ``fn`` for ``cuda:capability`` and report its resources. ``args``: name -> (type, sample value);
    ``maxnreg``: the register cap a launch passes (Triton's ``maxnreg`` option, PTX ``.maxnreg``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    signature = {name: ty for name, (ty, _) in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, args))
    backend = make_backend(target)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    options = backend.parse_options(opts)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    report = _ptxas_report(kernel.asm["ptx"], capability)
    report.update(kernel=fn.__name__, num_warps=num_warps, num_stages=num_stages,
                  shared_bytes=int(kernel.metadata.shared),
                  constexprs={k: v for k, v in constexprs.items()})
    return report


def report(*, uncond: bool = True, dtype: str = "bf16", argmax: bool = False, logprob: bool = False,
           overrides: dict | None = None) -> list[dict]:
    """Resources of the three kernels at the production configuration (``overrides`` change tiles;
    ``argmax`` adds the ARGMAX variants of select and finish; ``logprob`` the LOGPROB variants of
    select and finish, drawing and (with ``argmax``) argmax)."""
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))
    import torch
    from ursa_engine.triton_kernels import head_draw as hd

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    c = hd.head_config(D, K, H, torch.device("cuda"), tdt, **(overrides or {}))
    flags = dict(H=H, HAS_UNCOND=uncond, GUIDE_HIDDEN=bool(c["GUIDE_HIDDEN"]) and uncond, UPCAST=c["UPCAST"],
                 LOGIT_DTYPE=c["LOGIT_DTYPE"], DOT_PRECISION=c["DOT_PRECISION"], BLOCK_K=c["BLOCK_K"],
                 BLOCK_H=c["BLOCK_H"], TILES=c["TILES"])
    ptr = f"*{dtype}"
    common = dict(h_ptr=(ptr, 0), hu_ptr=(ptr, 0), w_ptr=(ptr, 0), D=("i32", D), K=("i32", K),
                  stride_h=("i32", H), stride_hu=("i32", H), stride_w=("i32", H), gs=("fp32", 7.0),
                  zs=("fp32", 1.4426950408889634))
    stats = dict(common, m_ptr=("*fp32", 0), s_ptr=("*fp32", 0), NC=("i32", c["NC"]))
    select = dict(m_ptr=("*fp32", 0), s_ptr=("*fp32", 0), chunk_ptr=("*i32", 0), resid_ptr=("*fp32", 0),
                  mx_ptr=("*fp32", 0), lse_ptr=("*fp32", 0), seeds_ptr=("*i64", 0), step_ptr=("*i64", 0),
                  row_len=("i32", D), index_offset=("i32", 1), D=("i32", D), NC=("i32", c["NC"]), zs=("fp32", 1.0))
    finish = dict(common, order_ptr=("*i64", 0), sorted_ptr=("*i32", 0), resid_ptr=("*fp32", 0),
                  mx_ptr=("*fp32", 0), out_ptr=("*i64", 0), lp_ptr=("*fp32", 0))

    def variants(am: bool, lp: bool) -> list[dict]:  # select and finish (pass one is the same kernel)
        return [compile_kernel(hd.head_select_kernel, select, dict(ARGMAX=am, LOGPROB=lp, ROWS=c["ROWS"],
                                                                    NC_P2=c["NC_P2"]), c["select_warps"], 1),
                compile_kernel(hd.head_finish_kernel, finish, dict(flags, ARGMAX=am, LOGPROB=lp, BLOCK_M=c["BLOCK_M2"]),
                               c["finish_warps"], c["finish_stages"])]

    rows = [compile_kernel(hd.head_stats_kernel, stats, dict(flags, BLOCK_M=c["BLOCK_M"], GROUP_M=c["GROUP_M"]),
                           c["stats_warps"], c["stats_stages"])] + variants(False, False)
    if argmax:  # the last step ("churning by argmax")
        rows += variants(True, False)
    if logprob:  # the rollout's x̂1 log-probabilities (DESIGN §9)
        rows += variants(False, True) + (variants(True, True) if argmax else [])
    return rows


def variant(r: dict) -> str:
    """``"argmax+logprob"``, ``"argmax"``, ``"logprob"`` or ``""`` from a row's constexprs."""
    cx = r.get("constexprs") or r.get("config") or {}
    return "+".join(name for name, flag in (("argmax", "ARGMAX"), ("logprob", "LOGPROB")) if cx.get(flag))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--no-uncond", action="store_true", help="without guidance (one dot)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--guide-hidden", action="store_true", help="the one-dot guided-hidden variant")
    ap.add_argument("--argmax", action="store_true", help="also the ARGMAX variants of select and finish")
    ap.add_argument("--logprob", action="store_true", help="also the LOGPROB variants of select and finish")
    for name in ("BLOCK_M", "BLOCK_K", "BLOCK_H", "BLOCK_M2", "TILES", "stats_warps", "stats_stages",
                 "finish_warps", "finish_stages"):
        ap.add_argument("--" + name.lower().replace("_", "-"), dest=name, type=int)
    a = ap.parse_args(argv)
    over = {k: getattr(a, k) for k in ("BLOCK_M", "BLOCK_K", "BLOCK_H", "BLOCK_M2", "TILES", "stats_warps",
                                        "stats_stages", "finish_warps", "finish_stages") if getattr(a, k)}
    if a.guide_hidden:
        over["GUIDE_HIDDEN"] = True
    rows = report(uncond=not a.no_uncond, dtype=a.dtype, argmax=a.argmax, logprob=a.logprob, overrides=over)
    for r in rows:
        spills = r["spill_store_bytes"] + r["spill_load_bytes"]
        name = r["kernel"] + (f"[{variant(r)}]" if variant(r) else "")
        print(f"{name:28s} warps {r['num_warps']} stages {r['num_stages']}: {r['registers']} registers, "
              f"{spills} spill bytes, {r['shared_bytes']} B shared")
    if a.json:
        from .provenance import write_text  # atomic: an interrupted run leaves no half-written result

        write_text(a.json, json.dumps([{k: v for k, v in r.items() if k != "ptxas_log"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
