"""The ``ursa-engine`` command line (docs/design.md §8).

``ursa-engine generate ROOT --prompt ... --out out.png|out.mp4|out.pt``: images, videos or tokens
(see :mod:`ursa_engine.cli_generate`);
``ursa-engine demo``: the bundled digits model on the CPU;
``ursa-engine serve [ROOT] --host 127.0.0.1 --port 8000``: the HTTP API with step-level continuous
batching (:mod:`ursa_engine.serve`);
``ursa-engine ui [ROOT] --port 7860``: a web page (Gradio) on the same batcher (:mod:`ursa_engine.ui`);
``ursa-engine bench run [SUITE...] --mode smoke|cpu|gpu``: benchmarks, one JSON per suite run;
``ursa-engine bench report RESULTS...``: markdown summary + PNG plot from result JSON;
``ursa-engine bench suite --out DIR``: the whole GPU suite (build, GPU tests, benchmarks);
``ursa-engine plan --preset ursa-1.7b --latents-shape 13 40 64``: the planned peak memory of a
generation, computed on the CPU (:func:`ursa_engine.memory.plan_generation`); with ``--training``, of
one training step (:func:`ursa_engine.memory.plan_training_step`).

Each subcommand registers itself through one ``_add_<name>(subparsers)`` function and imports
its implementation only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from ._cli_errors import PROG, UsageError, one_line, user_error_types
from ._cli_flags import add_checkpoint_flags, add_debug
from .cli_serve import add_serve, add_ui

__all__ = ["UsageError", "build_parser", "main"]


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="latency / memory / roofline benchmarks (benchmarks/)",
                                  description="Benchmarks; see benchmarks/__init__.py.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    run = sub.add_parser("run", help="run benchmark suites, one JSON per suite run")
    from ursa_engine.benchmarks import add_arguments

    add_arguments(run)
    run.set_defaults(handler=_bench_run)

    rep = sub.add_parser("report", help="summary.md + latency.png from result JSON")
    rep.add_argument("results", nargs="+", help="result JSON files or folders")
    rep.add_argument("--out", default=None, help="output folder (default: the first folder given)")
    rep.set_defaults(handler=_bench_report)

    suite = sub.add_parser("suite", help="the whole GPU suite in one call (python -m ursa_engine.benchmarks.gpu_suite)")
    suite.add_argument("args", nargs=argparse.REMAINDER, help="arguments of benchmarks.gpu_suite")
    suite.set_defaults(handler=_bench_suite)


def _bench_run(args) -> int:
    from ursa_engine.benchmarks.run import run_from_args

    return run_from_args(args)


def _bench_report(args) -> int:
    from ursa_engine.benchmarks import report

    argv = list(args.results) + (["--out", args.out] if args.out else [])
    return report.main(argv)


def _bench_suite(args) -> int:
    from ursa_engine.benchmarks import gpu_suite

    return gpu_suite.main(args.args)


def _add_generate(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="generate images / videos / latent tokens from an URSA checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Text-to-image, text-to-video, image-to-video (--image) and video extension (--video) with an URSA
checkpoint root. The format comes from --out: .png / .jpg (images; several are numbered name_0.png,
name_1.png, ...), .mp4 (H.264 video; several name_0.mp4, ...) or .pt (the (B, T, h, w) latent
tokens, not decoded). Pixel outputs and --height/--width/--frames/--image/--video need the root's
vae/ tokenizer. Video extension writes the given video followed by the new frames (the authors'
README loop); its .pt holds the new clip's tokens, conditioning frames first. A JSON summary line
goes to stdout.""",
        epilog="""\
examples (defaults: 1024x1024 and 25 steps with an image tokenizer; 320x512, 49 frames and 50 steps for
video; 25 steps for one frame of a video tokenizer; --image / --video keep their own size):
  ursa-engine generate ./URSA-1.7B-IBQ1024 --prompt 'a bear in the snow' --out bear_1024.png
  ursa-engine generate ./URSA-1.7B-FSQ320 --prompt 'a bear in the snow' --out bear.png
  ursa-engine generate ./URSA-1.7B-FSQ320 --prompt 'a bear in the snow' --motion 9 --out bear.mp4
  ursa-engine generate ./URSA-1.7B-FSQ320 --prompt 'a bear in the snow' --motion 9 \\
      --image bear.png --out bear_i2v.mp4
  ursa-engine generate ./URSA-1.7B-FSQ320 --prompt 'a bear in the snow' --motion 5 \\
      --video bear.mp4 --out bear_85f.mp4            (49 given + 36 new frames)""")
    gen.add_argument("root", metavar="ROOT", help="checkpoint root: transformer/, scheduler/, tokenizer/, vae/; or a "
                                                  "hub id org/name (downloaded to the hub cache; HF_HUB_OFFLINE=1: "
                                                  "the cache only)")
    add_checkpoint_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for a batch)")
    gen.add_argument("--negative-prompt", default=None,
                     help="default: the authors' README negative prompt ('worst quality, low quality, ...'); "
                          "'' for none")
    gen.add_argument("--out", default="tokens.pt", help="output file: .png, .jpg, .jpeg, .mp4 or .pt (default: "
                                                        "tokens.pt)")
    size = gen.add_argument_group("size (pixels need vae/; --latents-shape excludes them)")
    size.add_argument("--height", type=int, default=None,
                      help="pixels (default: the --image / --video size, else 320 for video tokenizers and 1024 "
                           "for image tokenizers)")
    size.add_argument("--width", type=int, default=None,
                      help="pixels (default: the --image / --video size, else 512 for video tokenizers and 1024 "
                           "for image tokenizers)")
    size.add_argument("--frames", type=int, default=None,
                      help="pixel frames of the generated clip, 1 + 4k for video tokenizers; with --video they "
                           "include the --cond-frames (default: 49 for .mp4 / --image / --video with a video "
                           "tokenizer, else 1)")
    size.add_argument("--latents-shape", type=int, nargs="+", default=None, metavar="N",
                      help="latent grid T H W, or H W (default without vae/: 1 40 64, a 320x512 image)")
    cond = gen.add_argument_group("conditioning")
    cond.add_argument("--image", default=None, metavar="PATH", help="first frame (image-to-video), resized to the "
                                                                     "output size")
    cond.add_argument("--video", default=None, metavar="PATH", help="video to extend (.mp4), resized to the output "
                                                                     "size")
    cond.add_argument("--mask", default=None, metavar="PATH",
                      help="inpaint --image instead of conditioning on it: a mask image of --image's size; with an "
                           "alpha channel, fully transparent pixels are regenerated (OpenAI's convention), without "
                           "one, white (>= 128) is regenerated and black kept (diffusers'). Tokens whose whole patch "
                           "is kept hold --image's codes")
    cond.add_argument("--cond-frames", type=int, default=None,
                      help="last frames of --video that condition the new clip, 1 + 4k (default: 13)")
    cond.add_argument("--cond-noise-scale", type=float, default=None,
                      help="resample the conditioning frames at t = 1 - scale, in [0, 1] (default: 0.1 with --video, "
                           "the authors' extension; 0 with --image)")
    cond.add_argument("--freeze-cond", action="store_true",
                      help="keep the conditioning frames' codes fixed while sampling (default: they are sampled "
                           "like the others, as in the authors' pipeline)")
    samp = gen.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, default=None, help="default: 25 for images, 50 for video")
    samp.add_argument("--guidance", type=float, default=7.0)
    samp.add_argument("--guidance-trunc", type=float, default=0.9)
    samp.add_argument("--shift", type=float, default=None, help="override the checkpoint's shift")
    samp.add_argument("--motion", type=float, default=None,
                      help="video checkpoints' motion=X prompt prefix (authors: 9 for text/image-to-video, 5 for "
                           "extension)")
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--fps", type=float, default=None, help="frame rate of .mp4 output (default: the --video's, "
                                                              "else 12)")
    run = gen.add_argument_group("runtime")
    run.add_argument("--mode", default="auto", choices=["auto", "eager", "graph"])
    run.add_argument("--attn", default="auto", help="attention backend (ursa_engine.attention)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    run.add_argument("--prompt-length", type=int, default=320)
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--parallel", default=None, metavar="dp=N,cfg=N,sp=N",
                     help="several processes under torchrun (README, Many GPUs); rank 0 writes --out")
    gen.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                     help="a PEFT LoRA adapter folder merged into the transformer, times SCALE (default 1); repeat "
                          "for several (docs/design.md §9)")
    add_debug(gen)
    gen.set_defaults(handler=_generate)


def _generate(args) -> int:
    from .cli_generate import run

    return run(args)


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


def _add_plan(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="planned peak memory of a generation, or with --training of one training step (fake tensors "
                     "on the CPU: nothing is allocated)",
        description="Runs one guided denoising step of the engine (transformer, head + sampler as on a GPU: fused "
                    "kernels, fused attention) and the tokenizer's decode on fake tensors at real size and reports "
                    "the peak live bytes by phase (weights, inputs, activations, attention, MLP, head + sampler, "
                    "decode), the largest tensor of each and whether any tensor has D x K elements.")
    plan.add_argument("--preset", default="ursa-1.7b", help="model preset (default: ursa-1.7b); see ModelConfig")
    plan.add_argument("--root", default=None, metavar="CKPT",
                      help="a checkpoint root instead of a preset: its configs (transformer, scheduler codebook, vae) "
                           "are read, never its weights); or a hub id org/name (only those files are downloaded)")
    plan.add_argument("--revision", default=None, help="branch, tag or commit of a hub id --root (default: main)")
    plan.add_argument("--latents-shape", type=int, nargs="+", default=[13, 40, 64], metavar="N",
                      help="latent grid T H W or H W (default: 13 40 64 = 49 x 320 x 512 video)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    plan.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                      help="classifier-free guidance: 2B rows (default) or B")
    plan.add_argument("--batch", type=int, default=1, help="prompts per call (default 1)")
    plan.add_argument("--codebook", default="auto", choices=["auto", "fsq", "ibq"],
                      help="fsq: K = 64,000 and the video tokenizer; ibq: K = 131,072 and the IBQ1024 image "
                           "tokenizer; auto: ibq for one latent frame of at least 64 x 64, else fsq (presets only)")
    plan.add_argument("--head", default="auto", choices=["auto", "fused", "chunked"],
                      help="the engine's head (default auto: the fused lm_head + draw, as on a GPU)")
    plan.add_argument("--logits-budget", type=float, default=None, metavar="MIB",
                      help="MiB of logits a token range may hold (default: the engine's, 512; 0: whole logits)")
    plan.add_argument("--activation-budget", type=float, default=None, metavar="MIB",
                      help="MiB of an MLP intermediate before the sequence is chunked (default: the model's, 256; "
                           "0: never chunked)")
    plan.add_argument("--prompt-length", type=int, default=320)
    plan.add_argument("--no-decode", action="store_true", help="leave the tokenizer's decode out")
    plan.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    train = plan.add_argument_group(
        "training", "--training plans one training step instead: LatentLoss forward + backward (+ the optimizer "
                    "update) with the loss backend a GPU picks; reports the peak above the resident weights and "
                    "optimizer state and whether any tensor has n x K elements (n latent tokens a sample)")
    train.add_argument("--training", action="store_true", help="plan one training step")
    train.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="activation checkpointing of every decoder layer (default on)")
    train.add_argument("--optimizer", default="adamw", choices=["adamw", "none"],
                       help="adamw: fp32 moments resident, the update in the step (default); none: forward and "
                            "backward only")
    train.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=None,
                       help="an fp32 master copy of the parameters in the optimizer state (default: when --dtype is "
                            "not float32)")
    add_debug(plan)
    plan.set_defaults(handler=_plan)


def _plan(args) -> int:
    import torch

    from .engine import LOGITS_BUDGET
    from .memory import plan_generation
    from .model import ACTIVATION_BUDGET

    def mib(v, default):
        if v is None:
            return default
        if v < 0:
            raise UsageError(f"budget: expected a number of MiB >= 0 (0: no budget), got {v}")
        return int(v * 2**20) or None

    if len(args.latents_shape) not in (2, 3) or min(args.latents_shape) < 1:
        raise UsageError(f"--latents-shape: expected T H W or H W of positive sizes, got {args.latents_shape}")
    if args.batch < 1:
        raise UsageError(f"--batch: expected a positive int, got {args.batch}")
    if args.root is not None:
        from pathlib import Path

        from .cli_generate import resolve_cli_root

        args.root = str(resolve_cli_root(args.root, args.revision, flag="--root", weights=False))
        missing = [f for f in ("transformer/config.json", "scheduler/scheduler_config.json")
                   if not (Path(args.root) / f).is_file()]
        if missing:
            raise UsageError(f"--root: {args.root} has no {' and no '.join(missing)}")
    else:
        from .config import ModelConfig

        if args.revision is not None:
            raise UsageError("--revision: only applies to a hub id --root")
        if args.preset not in ModelConfig.PRESETS:
            raise UsageError(f"--preset: unknown {args.preset!r}, expected one of {sorted(ModelConfig.PRESETS)}")
    if args.training:
        return _plan_training(args)
    plan = plan_generation(args.preset, tuple(args.latents_shape), dtype=getattr(torch, args.dtype), cfg=args.cfg,
                           batch=args.batch, root=args.root, codebook=args.codebook, prompt_length=args.prompt_length,
                           head=args.head, logits_budget=mib(args.logits_budget, LOGITS_BUDGET),
                           activation_budget=mib(args.activation_budget, ACTIVATION_BUDGET),
                           decode=not args.no_decode)
    print(plan.to_json() if args.json else plan.table())
    return 0


def _plan_training(args) -> int:
    import torch

    from .memory import plan_training_step
    from .memory.generation import _config_and_codebook

    unused = [flag for flag, given in (("--no-cfg", not args.cfg), ("--head", args.head != "auto"),
                                       ("--logits-budget", args.logits_budget is not None),
                                       ("--activation-budget", args.activation_budget is not None),
                                       ("--no-decode", args.no_decode)) if given]
    if unused:
        raise UsageError(f"--training: {', '.join(unused)} only apply to the generation plan")
    T, H, W = (1, *args.latents_shape) if len(args.latents_shape) == 2 else args.latents_shape
    codebook = args.codebook if args.codebook != "auto" else ("ibq" if T == 1 and H * W >= 64 * 64 else "fsq")
    config, _, _, _, name = _config_and_codebook(args.preset, args.root, codebook)  # the generation plan's sizes
    plan = plan_training_step(config, (T, H, W), batch=args.batch, dtype=getattr(torch, args.dtype),
                              prompt_length=args.prompt_length, checkpointing=args.checkpointing,
                              optimizer=None if args.optimizer == "none" else args.optimizer,
                              master_weights=args.master_weights, name=name)
    print(plan.to_json() if args.json else plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_debug(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_generate(subparsers)
    _add_plan(subparsers)
    add_serve(subparsers)
    add_ui(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors (:class:`UsageError`, checkpoint / tokenizer errors) print one line
    ``ursa-engine: error: ...`` to stderr and return 2 like argparse; any other exception is a bug
    and keeps its traceback. ``--debug`` shows the traceback of everything."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except Exception as err:
        if args.debug or not isinstance(err, user_error_types()):
            raise
        print(f"{parser.prog}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
