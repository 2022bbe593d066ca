"""`python -m flashjax <command>`: the package's command line.

Commands:
  bench   benchmark attention implementations (`python -m flashjax bench --help`)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: python -m flashjax <command> [options]

commands:
  bench   benchmark flashjax against cuDNN, XLA, tokamax and torch attention
          (python -m flashjax bench --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bench":
        from flashjax.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
