"""The ``ursa-engine`` command line (DESIGN §8).

``ursa-engine bench run [SUITE...] --mode smoke|cpu|gpu``: benchmarks, one JSON per suite run;
``ursa-engine bench report RESULTS...``: markdown summary + PNG plot from result JSON;
``ursa-engine bench suite --out DIR``: the whole GPU suite (build, GPU tests, benchmarks).

Each subcommand registers itself through one ``_add_<name>(subparsers)`` function and imports
its implementation only when it runs.
"""

from __future__ import annotations

import argparse
import sys


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="latency / memory / roofline benchmarks (benchmarks/)",
                                  description="Benchmarks; see benchmarks/__init__.py.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    run = sub.add_parser("run", help="run benchmark suites, one JSON per suite run")
    from benchmarks import add_arguments

    add_arguments(run)
    run.set_defaults(handler=_bench_run)

    rep = sub.add_parser("report", help="summary.md + latency.png from result JSON")
    rep.add_argument("results", nargs="+", help="result JSON files or folders")
    rep.add_argument("--out", default=None, help="output folder (default: the first folder given)")
    rep.set_defaults(handler=_bench_report)

    suite = sub.add_parser("suite", help="the whole GPU suite in one call (python -m benchmarks.gpu_suite)")
    suite.add_argument("args", nargs=argparse.REMAINDER, help="arguments of benchmarks.gpu_suite")
    suite.set_defaults(handler=_bench_suite)


def _bench_run(args) -> int:
    from benchmarks.run import run_from_args

    return run_from_args(args)


def _bench_report(args) -> int:
    from benchmarks import report

    argv = list(args.results) + (["--out", args.out] if args.out else [])
    return report.main(argv)


def _bench_suite(args) -> int:
    from benchmarks import gpu_suite

    return gpu_suite.main(args.args)


def _add_generate(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate latent tokens from an URSA checkpoint",
                                description="Text-to-image / video latent tokens (ursa_engine.engine).")
    gen.add_argument("root", help="checkpoint root: transformer/, scheduler/, tokenizer/")
    gen.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for a batch)")
    gen.add_argument("--negative-prompt", default=None, help="default: the authors' negative prompt")
    gen.add_argument("--latents-shape", type=int, nargs="+", default=[1, 40, 64], metavar="N",
                     help="T H W, or H W (default: 1 40 64, a 320x512 image)")
    gen.add_argument("--steps", type=int, default=None, help="default: 25 for images, 50 for video")
    gen.add_argument("--guidance", type=float, default=7.0)
    gen.add_argument("--guidance-trunc", type=float, default=0.9)
    gen.add_argument("--shift", type=float, default=None, help="override the checkpoint's shift")
    gen.add_argument("--motion", type=float, default=None, help="video checkpoints' motion=X prefix")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--mode", default="auto", choices=["auto", "eager", "graph"])
    gen.add_argument("--attn", default="auto", help="attention backend (ursa_engine.attention)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--prompt-length", type=int, default=320)
    gen.add_argument("--out", default="tokens.pt", help="where the (B, T, H, W) tokens are saved")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(handler=_generate)


def _generate(args) -> int:
    from ursa_engine.engine import cli_generate

    return cli_generate(args)


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="sample the bundled digits model on the CPU (samples.png, samples.npz)",
                                 description="Class-conditional digit images and videos, one image-to-video and "
                                             "one start-end interpolation from the embedded default model.")
    demo.add_argument("--out", default="samples", help="output folder (default: ./samples)")
    demo.add_argument("--root", default=None, help="a digits checkpoint root (default: the bundled model)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--per-class", type=int, default=4, help="images per digit class")
    demo.add_argument("--steps", type=int, default=25, help="sampling steps")
    demo.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    demo.set_defaults(handler=_demo)


def _demo(args) -> int:
    from .demo import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ursa-engine", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
