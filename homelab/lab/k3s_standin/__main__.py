"""The `k3s` command line of the stand-in: `k3s server`, `k3s agent`, `k3s --version`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .version import read_version, version_line

USAGE = """NAME:
   k3s - Kubernetes, but small and simple (stand-in)

USAGE:
   k3s [global options] command [command options] [arguments...]

COMMANDS:
   server  Run management server
   agent   Run node agent

GLOBAL OPTIONS:
   --version, -v  print the version
   --help, -h     show help
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    if args[0] in ("-v", "--version", "version"):
        sys.stdout.write(version_line(read_version()) + "\n")
        return 0
    command, rest = args[0], args[1:]
    if command == "server":
        from . import server

        return server.run(rest, os.environ)
    if command == "agent":
        from . import agent

        return agent.run(rest, os.environ)
    sys.stderr.write(f'time="" level=fatal msg="k3s stand-in: command {command!r} is not provided by the stand-in '
                     '(server, agent, --version are)"\n')
    return 1


if __name__ == "__main__":
    sys.exit(main())
