"""What every command line shares: a failure is one line on stderr and a non-zero exit, never a traceback.

    p = cli.Parser(prog="python -m sample", description=...)     # argparse; adds --debug
    p.add_argument("--guidance", type=cli.finite_float, default=7.5)
    ...
    if __name__ == "__main__":
        sys.exit(cli.run(main, prog="python -m sample"))

A bad input is `p.error(message)`: `prog: error: message` and exit status 2. Anything else that escapes
`main` is one line naming the exception, exit status 1. With `--debug` or the environment variable
JAXDIFF_DEBUG=1 the traceback is shown instead (also behind a `p.error` called while handling one).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "JAXDIFF_DEBUG"


def debugging(argv: Sequence[str] | None = None) -> bool:
    """True with --debug among the arguments (sys.argv's when argv is None) or JAXDIFF_DEBUG set to non-0."""
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0") or "--debug" in args


def one_line(message) -> str:
    """A multi-line message (a loader's list of problems) as one line: its lines joined by '; ' (by ' ' after
    a line that ends in ':')."""
    out = ""
    for line in filter(None, (raw.strip() for raw in str(message).splitlines())):
        out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def finite_float(text: str) -> float:
    """argparse type: a float that is not nan or +-inf (float() accepts those)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), with a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.debug = debugging()
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of a failure (also: environment variable {DEBUG_ENV}=1)")

    def parse_args(self, args=None, namespace=None):
        self.debug = debugging(args)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        handling = sys.exc_info()[1]
        if self.debug and handling is not None and not isinstance(handling, argparse.ArgumentError):
            raise handling  # the exception being handled, with its traceback
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *, prog: str) -> int:
    """main(argv)'s exit status; an exception that escapes it is one line on stderr and status 1
    (130 for Ctrl-C), unless debugging."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last line of defence: report, do not crash
        if debugging(argv):
            raise
        print(f"{prog}: error: {type(e).__name__}: {one_line(e) or 'no message'} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1
