"""Markdown summary, PNG plot and the paper comparison, generated from result JSON only.

``python -m ursa_engine.benchmarks.report RESULTS... [--out DIR]`` (files or folders of ``*.json``) writes
``DIR/summary.md`` and ``DIR/latency.png`` (latency vs tokens per backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB = 2**30
TABLE_HEAD = ("| case | provider | median ms | min–max ms | throughput | floor ms | × floor | speedup | "
              "peak GiB | MFU | targets |")
PAPER_HEAD = "| model | latent grid | paper s / video | ours s / video | ours: how | our device | paper / ours |"
PAPER_NOTE = (
    "Paper: URSA/UDM-1.7B, appendix J Table 6 — 70 s for a 49×240×384 video (19K tokens) and "
    "180 s for 49×512×320 (34K tokens), per video, **hardware, step count and what the time "
    "includes are not stated**. Ours: random weights, 50 steps, CFG 7 until t = 0.9, shift 1, "
    "token generation only (no text encoder, no VAE decode). `projected` = Σ of step latencies "
    "measured in the same run; `measured` = `Engine.generate` end to end. Not a like-for-like "
    "comparison: read it as an order of magnitude."
)


def load(paths) -> list[dict]:
    """Result documents from files and folders (``*.json``, sorted), skipping unreadable ones."""
    docs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and "records" in doc:
                doc["_file"] = f.name
                docs.append(doc)
    return docs


def _fmt(v, spec=".3g", none="–"):
    if v is None:
        return none
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ms(v) -> str:
    """Milliseconds with sensible precision (``1,312``, ``41.7``, ``2.84``, ``0.0123``)."""
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else (f"{v:.2f}" if v >= 1 else f"{v:.3g}")


def _target(name: str, value: float) -> str:
    return f"{name} {value / 1e9:g} GB" if name.endswith("_bytes") else f"{name} {value:g}"


def _targets(rec: dict) -> str:
    meets = rec.get("meets") or {}
    return ", ".join(f"{_target(k, rec['targets'][k])}: {'PASS' if ok else 'FAIL'}" for k, ok in meets.items())


def _record_row(rec: dict) -> str:
    if rec["status"] != "ok":
        reason = str(rec.get("reason") or "").splitlines()[0][:160].replace("|", "/")
        return f"| {rec['case']} | {rec['provider']} | {rec['status']}: {reason} |" + " |" * 8
    spread = f"{_ms(rec['min_ms'])}–{_ms(rec['max_ms'])}"
    thr = f"{rec['throughput']:.4g} {rec['throughput_unit']}" if rec.get("throughput") else "–"
    peak = f"{rec['peak_mem_bytes'] / GIB:.2f}" if rec.get("peak_mem_bytes") is not None else "–"
    mfu = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "–"
    vs = rec.get("speedup_vs_dense") or rec.get("speedup_vs_eager")
    vs_txt = "–" if vs is None else f"{vs:.3g}× vs {'dense' if rec.get('speedup_vs_dense') else 'eager'}"
    note = " (scaled)" if rec.get("scaled") else ""
    return (f"| {rec['case']} | {rec['provider']} | {_ms(rec['median_ms'])}{note} | {spread} | {thr} | "
            f"{_ms(rec.get('floor_ms'))} | {_fmt(rec.get('ratio_to_floor'), '.3g')} | {vs_txt} | "
            f"{peak} | {mfu} | {_targets(rec)} |")


def markdown(docs: list[dict]) -> str:
    lines = ["# ursa-engine benchmark summary", ""]
    if not docs:
        return "\n".join(lines + ["No results.", ""])
    for doc in docs:
        dev, soft, ceil = doc.get("device", {}), doc.get("software", {}), doc.get("ceilings") or {}
        lines += [f"## {doc.get('suite', '?')} — {doc.get('mode')} — {dev.get('name')}", "",
                  (f"`{doc['_file']}` · commit `{str(doc.get('commit'))[:12]}`"
                   f"{' (dirty)' if doc.get('dirty') else ''} · {doc.get('created')} · driver "
                   f"{dev.get('driver')} · torch {soft.get('torch')} (CUDA {soft.get('torch_cuda')}) · "
                   f"triton {soft.get('triton')} · threads {soft.get('torch_threads')}")]
        if dev.get("type") == "cuda":
            lines.append(f"clocks SM {dev.get('sm_clock_mhz')}/{dev.get('max_sm_clock_mhz')} MHz, memory "
                         f"{dev.get('mem_clock_mhz')} MHz · power {_fmt(dev.get('power_w'))}/"
                         f"{_fmt(dev.get('power_limit_w'))} W · {_fmt(dev.get('temperature_c'))} °C")
        if ceil:
            lines.append(f"ceilings measured in this run: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s "
                         f"(read + write), {ceil['matmul_dtype']} matmul {ceil['matmul_n']}³ "
                         f"{ceil['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s")
        lines += ["", TABLE_HEAD, "|" + "---|" * 11]
        lines += [_record_row(r) for r in doc["records"]]
        notes = sorted({r["scale_note"] for r in doc["records"] if r.get("scale_note")}
                       | {f"{r['case']} {r['provider']}: {r['warning']}" for r in doc["records"] if r.get("warning")})
        lines += [""] + [f"- {n}" for n in notes] + [""]
    lines += paper_comparison(docs) + targets_section(docs)
    return "\n".join(lines)


def brief(docs: list[dict]) -> str:
    """One line per measured record (skips and errors counted), for a terminal or a log tail."""
    from .records import format_line

    lines, failed = [], []
    for doc in docs:
        for r in doc["records"]:
            if r["status"] == "ok":
                lines.append(format_line(r))
            else:
                failed.append(f"{r['suite']}/{r['case']}/{r['provider']}: {r['status']}")
    if failed:
        lines.append(f"not measured ({len(failed)}): " + "; ".join(failed))
    return "\n".join(lines)


def paper_comparison(docs: list[dict]) -> list[str]:
    """Our 1.7B generation latencies next to the paper's, labelled for what they are."""
    rows = []
    for doc in docs:
        for r in doc["records"]:
            paper = (r.get("shape") or {}).get("paper_s")
            if r.get("suite") != "generate" or not paper:
                continue
            s = r["shape"]
            ours = f"{r['median_ms'] / 1e3:.1f}" if r["status"] == "ok" else f"{r['status']}"
            ratio = f"{paper / (r['median_ms'] / 1e3):.2f}×" if r["status"] == "ok" else "–"
            rows.append(f"| 1.7B | {'×'.join(map(str, s['latents']))} ({s['tokens']:,} tokens) | {paper:g} "
                        f"(hardware unstated) | {ours} | {r['provider']} | {r.get('device_name')} | {ratio} |")
    if not rows:
        return []
    return ["## Comparison with the paper's reported latencies", "", PAPER_NOTE, "",
            PAPER_HEAD, "|---|---|---|---|---|---|---|", *rows, ""]


def targets_section(docs: list[dict]) -> list[str]:
    rows = []
    for doc in docs:
        for r in doc["records"]:
            for name, ok in (r.get("meets") or {}).items():
                rows.append(f"| {r['suite']} | {r['case']} | {r['provider']} | {_target(name, r['targets'][name])} "
                            f"| {'PASS' if ok else 'FAIL'} |")
    if not rows:
        return []
    return ["## Targets", "", "| suite | case | provider | target | result |", "|---|---|---|---|---|",
            *rows, ""]


def plot(docs: list[dict], path: Path) -> Path | None:
    """Latency vs tokens per backend: model step (left), metric-path sampler step (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = {"model_step": {}, "metric_step": {}}
    for doc in docs:
        for r in doc["records"]:
            if r["status"] != "ok" or r.get("suite") not in panels:
                continue
            s = r.get("shape") or {}
            if r["suite"] == "model_step":
                key = f"{s.get('preset')} {r['provider']}"
            elif s.get("codebook", "").startswith("fsq"):
                key = f"{r['provider']} K={s.get('K')} ({s.get('dtype')})"
            else:
                continue
            panels[r["suite"]].setdefault(key, []).append((s.get("tokens"), r["median_ms"]))
    if not any(panels.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    titles = {"model_step": "model step (CFG batch 2)",
              "metric_step": "metric-path sampler step, FSQ codebook, CFG pair"}
    for ax, (suite, series) in zip(axes, panels.items(), strict=False):
        for key, pts in sorted(series.items()):
            pts = sorted(p for p in pts if p[0])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(titles[suite])
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    dev = next((d.get("device", {}).get("name") for d in docs), "")
    commit = next((str(d.get("commit"))[:7] for d in docs), "")
    fig.suptitle(f"ursa-engine latency — {dev} — {commit}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(paths, out_dir) -> tuple[Path, Path | None]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = load(paths)
    md = out_dir / "summary.md"
    md.write_text(markdown(docs))
    png = plot(docs, out_dir / "latency.png")
    return md, png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ursa-engine bench report", description=__doc__)
    p.add_argument("results", nargs="+", type=Path, help="result JSON files or folders")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the first folder given)")
    args = p.parse_args(argv)
    out = args.out or (args.results[0] if args.results[0].is_dir() else args.results[0].parent)
    md, png = write_report(args.results, out)
    print(f"wrote {md}" + (f" and {png}" if png else " (no plot: matplotlib missing or nothing to plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
