"""`enclave connect`: the stdio wrapper local MCP clients launch to reach the gateway."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import CommandError, Commands, load
from gateway.clients import TokenError, read_token


def cmd_connect(args: argparse.Namespace) -> int:
    from gateway import connect  # the HTTP client stack, only for this command
    from gateway.peers import agents_socket

    try:
        token = read_token(args.token_file)
    except TokenError as exc:
        raise CommandError(str(exc)) from None
    if args.url:
        return connect.run(token, socket_path=None, url=args.url, wait=args.wait)
    socket_path = args.socket or agents_socket(load(args).settings.state_dir)
    return connect.run(token, socket_path=socket_path, url=None, wait=args.wait)


class RefuseToken(argparse.Action):
    """`--token`: refused with a reason, and without repeating the token."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        parser.error(
            "tokens are never taken from the command line, which every local user can read: set ENCLAVE_TOKEN or "
            "use --token-file PATH; revoke the token you typed (enclave agent revoke NAME) and mint a new one"
        )


def register(commands: Commands) -> None:
    connect = commands.add_parser(
        "connect",
        allow_abbrev=False,  # `--token X` must not pass for `--token-file X`
        help="stdio MCP server for local clients: relays to the gateway (both protocol eras), which records "
        "the process that launched it",
        description="Relay MCP between stdin/stdout and the gateway, over its Unix socket (state_dir/agents.sock, "
        "where the gateway attributes the connection to the launching process) or an HTTP URL. The agent token "
        "comes from $ENCLAVE_TOKEN or --token-file, never from the command line.",
    )
    target = connect.add_mutually_exclusive_group()
    target.add_argument("--socket", type=Path, metavar="PATH", help="the agents socket (default: from --config)")
    target.add_argument("--url", metavar="URL", help="the gateway's MCP URL instead, e.g. http://127.0.0.1:8765/mcp")
    connect.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the agent token (mode 600)")
    connect.add_argument("--token", action=RefuseToken, help=argparse.SUPPRESS)
    connect.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="how long a request waits for an unreachable gateway, e.g. one that is restarting (default: 10)",
    )
    connect.set_defaults(func=cmd_connect)
