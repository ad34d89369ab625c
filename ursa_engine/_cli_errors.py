"""What the command line tells its user: user errors (one line, exit status 2) and warnings.

:mod:`ursa_engine.cli` (which prints them) and the subcommands (which raise them) both import this
module, so the dependency goes one way: cli -> subcommand -> _cli_errors.
"""

from __future__ import annotations

import sys

PROG = "ursa-engine"


class UsageError(Exception):
    """A mistake in the command line or in the files it names: one line on stderr, exit status 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """UsageError and the loaders' own error classes (only if their modules were imported: an error
    of a module never imported cannot have been raised)."""
    types: list[type[BaseException]] = [UsageError]
    for module, name in (("ursa_engine.checkpoint", "CheckpointError"), ("ursa_engine.vae", "TokenizerError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def warn(message: str) -> None:
    """``ursa-engine: warning: ...`` on stderr, one line; the run goes on."""
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)
