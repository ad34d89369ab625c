"""``ursa-engine serve`` and ``ursa-engine ui``: their flags and handlers (:mod:`ursa_engine.serve`,
:mod:`ursa_engine.ui`). Both take the server's security and request limits from the same flags
(:func:`add_limit_flags` -> :class:`ursa_engine.serve.security.Limits`)."""

from __future__ import annotations

import argparse

from ._cli_errors import UsageError, one_line
from ._cli_flags import add_checkpoint_flags, add_debug


def add_serve(subparsers) -> None:
    srv = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API with step-level continuous batching (images, edits, videos)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a checkpoint over HTTP (FastAPI + uvicorn): requests join the running batch at the next "
                    "step boundary and leave when done (ursa_engine.serve). OpenAI routes: POST "
                    "/v1/images/generations, POST /v1/images/edits (masks: token-level inpainting), POST /v1/videos, "
                    "GET|DELETE /v1/videos/{id}, GET /v1/videos, GET /v1/videos/{id}/content, POST "
                    "/v1/videos/extensions, GET /v1/models; ours: GET|DELETE /v1/requests/{id}, GET "
                    "/v1/requests/{id}/events (SSE), /health, /metrics.",
        epilog="""\
example:
  ursa-engine serve --port 8000 &        (the bundled digits model on the CPU)
  curl -s localhost:8000/v1/images/generations -H 'content-type: application/json' \\
       -d '{"prompt": "7", "response_format": "png", "seed": 1}' -o seven.png""")
    srv.add_argument("root", metavar="ROOT", nargs="?", default=None,
                     help="checkpoint root or hub id org/name (default: the bundled digits model)")
    add_checkpoint_flags(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-rows", type=int, default=16,
                     help="rows in flight across all latent shapes, cond + uncond; also the rows of one forward pass "
                          "(default 16)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    srv.add_argument("--max-tokens", type=int, default=None,
                     help="latent tokens x rows of one forward pass; bigger requests get a 400 before any allocation "
                          "(default 4 x 13x40x64: a guided pair of URSA 49-frame 320x512 videos)")
    srv.add_argument("--policy", default="continuous", choices=["continuous", "static", "sequential"],
                     help="batching policy (default: continuous)")
    srv.add_argument("--graphs", action="store_true",
                     help="CUDA graphs per (rows, shape) bucket (CUDA engines only: an error on the CPU)")
    srv.add_argument("--device", default=None, help="cpu, cuda, ... (URSA roots; digits run on the CPU)")
    srv.add_argument("--drain-seconds", type=float, default=30.0,
                     help="on SIGTERM / Ctrl-C: new requests get 503, the accepted ones get this long to finish, "
                          "then are cancelled with a notice; exit 0 (default 30; a second signal stops at once)")
    srv.add_argument("--log-level", default="info")
    add_limit_flags(srv)
    srv.add_argument("--lora", action="append", default=None, metavar="[NAME=]PATH[:SCALE]",
                     help="a PEFT LoRA adapter folder, repeatable: PATH[:SCALE] is merged into the served model (every "
                          "request); NAME=PATH[:SCALE] is applied per request, to the requests that send "
                          "\"lora\": \"NAME\" (rows of different adapters share each forward pass)")
    srv.add_argument("--ui", action="store_true",
                     help="also serve the web UI (Gradio, pip install 'ursa-engine[ui]') at /ui on the same batcher; "
                          "with API keys it opens on a login whose password is a key")
    add_debug(srv)
    srv.set_defaults(handler=_serve)


def _lora_specs(specs, *, named: bool) -> list:
    """``--lora`` values -> (name, path, scale) triples; a UsageError names the flag."""
    from .adapters import parse_lora_spec

    try:
        return [parse_lora_spec(s, named=named) for s in specs or ()]
    except ValueError as err:
        raise UsageError(str(err)) from None


def add_limit_flags(parser, *, page: bool = False) -> None:
    """The security and request limits of :class:`ursa_engine.serve.security.Limits` (``page``: the
    flags of ``ursa-engine ui``, whose page has no HTTP API: no metrics, CORS, body or store flags)."""
    sec = parser.add_argument_group("security and limits (ursa_engine.serve.security)")
    sec.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="the page asks for a login whose password is KEY, repeatable (also URSA_API_KEY)" if page
                     else "accept Authorization: Bearer KEY, repeatable (also URSA_API_KEY, comma-separated); with "
                          "keys every route but /health needs one, and a request is visible and cancellable only "
                          "with the key that made it")
    sec.add_argument("--max-prompt-chars", type=int, default=4096,
                     help="characters of prompt / negative_prompt, refused before tokenizing (default 4096)")
    sec.add_argument("--max-concurrent-per-key", type=int, default=None, metavar="N",
                     help="queued + running requests of one key (or of all callers without keys); refused over it "
                          "(default: no limit beyond --max-queue)")
    sec.add_argument("--max-upload-bytes", type=int, default=32 << 20,
                     help="bytes of an upload (the page's uploads; the API's /v1/images/edits, /v1/videos, "
                          "/v1/videos/extensions bodies), 413 over (default 32 MiB)")
    sec.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                     help="width x height of an uploaded image or video frame, read from its header before decoding "
                          "(decompression bombs; default 4096 x 4096)")
    sec.add_argument("--max-video-frames", type=int, default=257,
                     help="frames of an uploaded video, and of a video the videos routes return (default 257)")
    if page:
        return
    sec.add_argument("--metrics-public", action="store_true", help="/metrics without a key")
    sec.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body bytes, 413 over (default 1 MiB)")
    sec.add_argument("--max-n", type=int, default=16, help="samples of one request (default 16)")
    sec.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                     help="allow browser calls from ORIGIN, repeatable (default: no CORS headers)")
    sec.add_argument("--max-stored-results", type=int, default=256,
                     help="finished video jobs kept for download, oldest dropped first (default 256)")
    sec.add_argument("--max-stored-bytes", type=int, default=2 << 30,
                     help="bytes of stored results, oldest dropped first (default 2 GiB)")
    sec.add_argument("--result-ttl-s", type=int, default=3600,
                     help="seconds a stored result is kept (default 3600)")
    sec.add_argument("--max-body-bytes-in-flight", type=int, default=256 << 20,
                     help="request body bytes buffered at once across all requests; 429 + Retry-After over it "
                          "(default 256 MiB)")


# flags that go to ursa_engine.serve.security.Limits as they are (when the subcommand has them)
LIMIT_FLAGS = ("metrics_public", "max_body_bytes", "max_prompt_chars", "max_n", "max_concurrent_per_key",
               "max_upload_bytes", "max_image_pixels", "max_video_frames", "max_stored_results", "max_stored_bytes",
               "result_ttl_s", "max_body_bytes_in_flight")


def limits_from(args):
    """The :class:`~ursa_engine.serve.security.Limits` of parsed flags; a UsageError names a bad flag."""
    import os

    from .serve.security import Limits, keys_from_env

    for name in LIMIT_FLAGS:
        v = getattr(args, name, None)
        if v is not None and not isinstance(v, bool) and v < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    try:  # the flags' keys and URSA_API_KEY's are all accepted
        return Limits(api_keys=(args.api_key or []) + keys_from_env(os.environ.get("URSA_API_KEY")),
                      cors_origins=getattr(args, "cors_origin", None) or (),
                      **{name: getattr(args, name) for name in LIMIT_FLAGS if hasattr(args, name)})
    except ValueError as err:
        name, _, rest = str(err).partition(":")
        raise UsageError(f"--{name.replace('_', '-')}:{rest}") from None



def _serve(args) -> int:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port: expected 0..65535, got {args.port}")
    if not 0 <= args.drain_seconds < float("inf"):
        raise UsageError(f"--drain-seconds: expected seconds >= 0, got {args.drain_seconds}")
    for name in ("max_rows", "max_queue", "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.graphs:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--graphs: CUDA graphs need a CUDA device (an URSA root with --device cuda); none is "
                             "available")
        if (args.device or "cuda").split(":")[0] != "cuda":
            raise UsageError(f"--graphs: CUDA graphs need --device cuda, got --device {args.device}")
    try:
        from .serve.app import serve
        from .serve.batcher import DEFAULT_MAX_TOKENS
    except ImportError as err:
        raise UsageError(f"serve: needs FastAPI and uvicorn (pip install 'ursa-engine[serve]'): {err}") from None
    if args.root is None and (args.transformer_weights is not None or args.revision is not None):
        raise UsageError("--transformer-weights / --revision: need a checkpoint ROOT (the bundled digits model "
                         "takes neither)")
    from pathlib import Path

    if args.transformer_weights is not None and not Path(args.transformer_weights).exists():
        raise UsageError(f"--transformer-weights: {args.transformer_weights} does not exist")
    limits = limits_from(args)
    from .hub import HubError

    try:
        serve(args.root, host=args.host, port=args.port, max_rows=args.max_rows, max_queue=args.max_queue,
              max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS, policy=args.policy, device=args.device,
              loras=_lora_specs(args.lora, named=True),
              graphs=args.graphs, log_level=args.log_level, transformer_weights=args.transformer_weights,
              revision=args.revision, drain_seconds=args.drain_seconds, limits=limits, ui=_ui_available(args.ui))
    except HubError as err:  # a hub id ROOT that cannot be resolved (nothing loaded yet)
        msg = one_line(err)
        raise UsageError("ROOT: " + msg[len("root: "):] if msg.startswith("root: ") else msg) from None
    except ValueError as err:
        if str(err).startswith("graphs:"):  # a CPU engine (the digits model) asked for CUDA graphs
            raise UsageError(f"--{err}") from None
        if str(err).startswith(("path:", "lora:", "name:")):  # an adapter of --lora that does not apply
            raise UsageError(f"--lora: {one_line(err).split(': ', 1)[1]}") from None
        if str(err).startswith("transformer_weights:"):  # the overlay's keys or file (one line, the flag's name)
            raise UsageError("--transformer-weights:" + one_line(err)[len("transformer_weights:"):]) from None
        raise
    return 0


def add_ui(subparsers) -> None:
    ui = subparsers.add_parser(
        "ui", help="a web UI (Gradio) on the step-level batcher: text/image to image/video in the browser",
        description="Serve a web page (Gradio) for a checkpoint: text -> image, text -> video, image -> video and "
                    "video extension, with a per-step progress bar. Requests from every open page go through one "
                    "step-level batcher (as `serve`), so they share forward passes. Named API endpoints for "
                    "gradio_client: /generate_image, /generate_video, /image_to_video, /extend_video "
                    "(ursa_engine.ui; pip install 'ursa-engine[ui]').",
        epilog="example: ursa-engine ui --port 7860   (the bundled digits model on the CPU; open http://127.0.0.1:7860)")
    ui.add_argument("root", metavar="ROOT", nargs="?", default=None,
                    help="checkpoint root (default: the bundled digits model)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--device", default=None, help="cpu, cuda, ... (URSA roots; digits run on the CPU)")
    ui.add_argument("--max-rows", type=int, default=16, help="rows of one forward pass, cond + uncond (default 16)")
    ui.add_argument("--max-queue", type=int, default=64, help="requests waiting before 'queue full' (default 64)")
    ui.add_argument("--max-tokens", type=int, default=None,
                     help="latent tokens x rows of one forward pass; bigger requests get a 400 before any allocation "
                          "(default 4 x 13x40x64: a guided pair of URSA 49-frame 320x512 videos)")
    add_limit_flags(ui, page=True)
    add_debug(ui)
    ui.set_defaults(handler=_ui)


def _ui(args) -> int:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port: expected 0..65535, got {args.port}")
    for name in ("max_rows", "max_queue", "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    try:
        import gradio  # noqa: F401 (the ui extra)

        from . import ui
    except ImportError as err:
        raise UsageError(f"ui: needs Gradio (pip install 'ursa-engine[ui]'): {err}") from None
    limits = limits_from(args)
    ui.launch(args.root, host=args.host, port=args.port, device=args.device, max_rows=args.max_rows,
              max_queue=args.max_queue, max_tokens=args.max_tokens, limits=limits)
    return 0


def _ui_available(ui: bool) -> bool:
    """``serve --ui``: Gradio must be installed (a UsageError naming the flag otherwise)."""
    if ui:
        try:
            import gradio  # noqa: F401
        except ImportError as err:
            raise UsageError(f"--ui: needs Gradio (pip install 'ursa-engine[ui]'): {err}") from None
    return ui
