"""`enclave serve` and `enclave check`."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.common import CommandError, Commands, load, resolve_secrets


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    _, _, problems = resolve_secrets(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise CommandError(f"{len(problems)} secret reference(s) cannot be resolved")
    agents = sum(len(e.agents) for e in config.enclaves.values())
    print(f"ok: {len(config.connectors)} connector(s), {len(config.enclaves)} enclave(s), {agents} agent(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve  # heavy imports only for this command

    config = load(args)
    resolver, secrets, problems = resolve_secrets(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise CommandError("refusing to start: fix the secret references above")
    return serve(config, resolver, secrets, listen=args.listen)


def register(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the gateway (MCP streamable HTTP, 127.0.0.1:8765 by default)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override listen.host/listen.port from gateway.yaml")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate the configuration and its secret references")
    check.set_defaults(func=cmd_check)
