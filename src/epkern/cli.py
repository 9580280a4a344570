"""The ``epkern`` command.

    epkern doctor [--json] [--no-smoke] [--timeout SECONDS]   what epkern sees here, and a smoke test
    epkern launch [-n N] ... MODULE:FUNCTION [ARG ...]         run a function on ranks (as epkern-launch)
    epkern --version

Each subcommand takes the options of the module it forwards to (``epkern <subcommand> --help``).
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(f"usage:\n{USAGE}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "--version":
        from . import __version__

        print(f"epkern {__version__}")
        return 0
    if command == "doctor":
        from . import doctor

        return doctor.main(rest, prog="epkern doctor", exit_if_stuck=argv is None)
    if command == "launch":
        from . import launch

        return launch.main(rest)
    print(f"epkern: unknown command {command!r}\nusage:\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
