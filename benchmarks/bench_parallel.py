"""Bytes moved per step and expected step time of each parallel layout on 8 GPUs (issue 13).

Computed, not timed: :func:`ursa_engine.distributed.cost.step_bytes` counts what each rank sends in
one denoising step (Ulysses all-to-alls, the CFG hidden-state exchange, the token all-gather) for
URSA-1.7B at 13 × 40 × 64 latents (33,280 tokens, 320 prompt tokens: L = 33,601; K = 64,000), bf16,
one sample per data-parallel rank. The expected step time divides a single-GPU step over the ranks
sharing it and adds the bytes at the NVLink rate (H100 SXM: 900 GB/s bidirectional, 450 GB/s each
way; no compute / communication overlap: an upper estimate).

Single-GPU step: **no measured figure exists yet**. Without ``--single-gpu-step-s`` the DESIGN §6
floor is used (the step's matmul FLOPs at 989 TFLOP/s dense bf16: 0.73 s guided) and every row
says ``"single_gpu": "predicted (docs/design.md §6 floor) - needs measured"``. Run
``python -m ursa_engine.benchmarks.bench_parallel --single-gpu-step-s 1.05`` with the measured
guided step (``bench_model_step``, 1.7B, 33,601 tokens × 2) once a GPU has measured it.

Writes ``benchmarks/results/parallel-bytes-<date>.json`` (or ``--out DIR``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
from pathlib import Path

from ursa_engine.benchmarks import provenance

from ursa_engine.config import ModelConfig
from ursa_engine.distributed.cost import expected_step_s
from ursa_engine.distributed.mesh import parse_layout

LATENTS = (13, 40, 64)
PROMPT_LEN = 320
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (DESIGN §6)
NVLINK = 450e9  # bytes/s each way per GPU (H100 SXM NVLink 4: 900 GB/s bidirectional)
LAYOUTS = ("dp=8", "dp=4,cfg=2", "dp=2,sp=4", "sp=8", "cfg=2,sp=4", "dp=2,cfg=2,sp=2")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rows(single_gpu_step_s: float | None = None, preset: str = "ursa-1.7b") -> list[dict]:
    """One row per layout and step kind (guided: 2 sequences per sample; unguided: past guidance_trunc)."""
    cfg = ModelConfig.preset(preset)
    n = LATENTS[0] * LATENTS[1] * LATENTS[2]
    L = PROMPT_LEN + 1 + n
    out = []
    for layout in LAYOUTS:
        for guided in (True, False):
            seqs = 2 if guided else 1
            predicted = cfg.forward_flops(L, batch=seqs, latent_tokens=n) / PEAK_FLOPS
            if single_gpu_step_s is None:
                single, source = predicted, "predicted (docs/design.md §6 floor) - needs measured"
            else:  # the measured guided step; unguided scaled by the FLOP ratio
                guided_flops = cfg.forward_flops(L, batch=2, latent_tokens=n)
                single = single_gpu_step_s * cfg.forward_flops(L, batch=seqs, latent_tokens=n) / guided_flops
                source = "measured"
            est = expected_step_s(cfg, LATENTS, layout, single_gpu_step_s=single, prompt_len=PROMPT_LEN,
                                  guided=guided, link_bytes_per_s=NVLINK)
            dp = parse_layout(layout).dp
            out.append({"layout": layout, "guided": guided, "preset": preset, "latents": list(LATENTS),
                        "seq_len": L, "bytes_per_rank": est["bytes"], "single_gpu_step_s": round(single, 4),
                        "single_gpu": source, "expected_step_s": round(est["step_s"], 4),
                        "compute_s": round(est["compute_s"], 4), "comm_s": round(est["comm_s"], 5),
                        "samples_per_step": dp, "speedup_vs_1gpu": round(single / est["step_s"], 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-gpu-step-s", type=float, default=None,
                        help="measured single-GPU guided step (1.7B, 13x40x64, bf16) in seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    provenance.add_argument(parser)
    args = parser.parse_args(argv)
    try:
        stamp = provenance.check(allow_dirty=args.allow_dirty)
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    table = rows(args.single_gpu_step_s)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    path = Path(args.out) / f"parallel-bytes-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"suite": "parallel-bytes", "commit": _commit(), "date": date, "gpus": 8, "link_bytes_per_s": NVLINK,
              "peak_flops": PEAK_FLOPS, "note": "computed from the config; step times are estimates"}
    provenance.write_json(path, {"header": header, "rows": table}, stamp)
    print(f"{'layout':<18}{'step':<9}{'ulysses MB':>11}{'cfg MB':>8}{'logits MB':>10}{'tokens MB':>10}"
          f"{'step s':>8}{'x1 GPU':>7}{'samples':>8}")
    for r in table:
        b = r["bytes_per_rank"]
        print(f"{r['layout']:<18}{'guided' if r['guided'] else 'cond':<9}{b['ulysses'] / 1e6:>11.1f}"
              f"{b['cfg_exchange'] / 1e6:>8.1f}{b['cfg_logits_instead'] / 1e6:>10.1f}{b['tokens'] / 1e6:>10.3f}"
              f"{r['expected_step_s']:>8.3f}{r['speedup_vs_1gpu']:>7.2f}{r['samples_per_step']:>8}")
    print(f"single-GPU step: {table[0]['single_gpu']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
