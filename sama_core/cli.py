"""How every command-line entry point ends: an expected problem (a SamaError) prints one line naming the
fix and exits 2, Ctrl-C prints what happens to the work and exits 130 (128 + SIGINT, what a shell reports
for Ctrl-C); neither prints a traceback. `python -m sama_core`, `python -m train` and train's other mains
share it so they all end alike."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from .errors import SamaError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def command_line(interrupted: str = "interrupted") -> Callable:
    """Decorator for `main(argv=None) -> int`; `interrupted` is the line printed on Ctrl-C: say what was
    kept and how to continue, e.g. "interrupted: resume with --resume latest"."""
    def decorate(main: Callable[..., Optional[int]]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return int(main(argv) or 0)
            except SamaError as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_ERROR
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                return EXIT_INTERRUPTED
        return run
    return decorate
