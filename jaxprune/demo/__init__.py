"""The demo: LeNets, data sets, recipes, the run and its checkpoints, and the ``jaxprune`` command.

It sits on top of the library; nothing in the core imports it. Its own dependencies (progress
bars and tables, plots) come with ``pip install 'jaxprune[demo]'``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Sequence

# What the command needs beyond the core: rich draws its bars and tables (flax depends on it too),
# matplotlib its plots. scikit-learn (the built-in digits) is checked where the digits are loaded.
DEPENDENCIES = ("rich", "matplotlib")


def missing_dependencies() -> list[str]:
    """The demo dependencies that cannot be imported here."""
    missing = []
    for name in DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Raising KeyboardInterrupt here could land in one of jax's garbage-collection callbacks
    # while jax loads, where Python swallows it and the run goes on as if nothing happened.
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxprune`` command: one line and exit status 2 when a demo dependency is missing.

    Run as the command (``argv`` None), Ctrl-C ends the process with status 130 at once
    (``os._exit``): XLA may still be compiling on its own threads, and the interpreter's teardown
    under them crashed with SIGSEGV. The checkpoints are written atomically, so nothing is lost.
    """
    if argv is None:  # until the command's own handler is in place, Ctrl-C ends it at once
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        missing = missing_dependencies()
        if missing:
            print(
                f"jaxprune: the command needs {', '.join(missing)}; install it with "
                "pip install 'jaxprune[demo]'",
                file=sys.stderr,
            )
            return 2
        from jaxprune.demo.cli import main as cli_main

        if argv is None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        status = cli_main(argv)
    except KeyboardInterrupt:  # while importing, before the command's own handler is in place
        print("interrupted", file=sys.stderr)
        status = 130
    if status == 130 and argv is None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return status
