"""The one argument-parsing scheme of every command: one-line errors, exit status 2, no tracebacks for bad input.

    parser = CLIParser(__doc__)
    parser.add_argument(...)
    sys.exit(run_cli(parser, body, argv))   # body(args) -> exit code; a UserError becomes 'error: ...'

Set SIT_ATCONV_DEBUG=1 to see the traceback of a user error.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import typing
from collections.abc import Callable, Sequence

from .errors import UserError

DEBUG_ENV = "SIT_ATCONV_DEBUG"


class CLIParser(argparse.ArgumentParser):
    """ArgumentParser with a docstring-driven help, no abbreviations, and one-line errors (exit 2)."""

    def __init__(self, doc: str | None = None, **kwargs):
        lines = (doc or "").strip().splitlines()
        kwargs.setdefault("description", lines[0] if lines else None)
        kwargs.setdefault("epilog", "\n".join(lines[1:]).strip() or None)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments: "):
            word = message.split(": ", 1)[1].split()[0].split("=")[0]
            flags = [o for a in self._actions for o in a.option_strings]
            match = difflib.get_close_matches(word, flags, n=1, cutoff=0.5) if word.startswith("-") else []
            message = (f"unknown option '{word}'" if word.startswith("-") else f"unexpected argument '{word}'") + (
                f"; did you mean '{match[0]}'?" if match else "")
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 is refused, never read as 'default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (inf and nan are refused, never passed on)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run `body(args)`; a UserError is printed as one line and gives exit status 2."""
    args = parser.parse_args(argv)
    try:
        return int(body(args) or 0)
    except UserError as err:
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker (whose message carries the worker's
    traceback), the original message line only."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "worker process" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(err)
