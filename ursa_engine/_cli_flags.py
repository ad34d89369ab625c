"""Flags that several subcommands of :mod:`ursa_engine.cli` share (``--debug``, checkpoint sources)."""

from __future__ import annotations

import argparse


def add_debug(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    # SUPPRESS on subcommands: `ursa-engine --debug generate ...` is not reset by the subparser
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of every error (user errors too)")


def add_checkpoint_flags(parser) -> None:
    parser.add_argument("--transformer-weights", default=None, metavar="PATH",
                        help="a fine-tuned transformer-only state dict laid over ROOT's transformer (.safetensors, "
                             ".bin, .pt or .pth file, or a folder; e.g. UDM-GRPO's transformer/"
                             "diffusion_pytorch_model.bin); torch files are read with weights_only=True")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub id ROOT (default: main)")
