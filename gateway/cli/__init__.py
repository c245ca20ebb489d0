"""`enclave`: the command line.

Each module registers its commands; errors go to stderr as one sentence a person can act on, with a
non-zero exit, and every listing supports --json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli import agents, chambers, clients, connect, governance, pins, reach, runtime
from gateway.cli.common import CommandError

MODULES = (runtime, agents, governance, chambers, pins, reach, connect, clients)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enclave", description="An MCP gateway that contains AI agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        default=os.environ.get("ENCLAVE_CONFIG", "."),
        help="configuration directory holding gateway.yaml, connectors/ and enclaves/ (default: . or $ENCLAVE_CONFIG)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"enclave: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
