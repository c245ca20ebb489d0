"""`enclave`: the command line (serve, check, agent add|list|revoke).

Errors go to stderr as one sentence a person can act on, with a non-zero exit; listings support --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from gateway import __version__, control, tokens
from gateway.config import Config, ConfigError, StdioTarget, load_config
from gateway.redact import MIN_SECRET_LENGTH
from gateway.secrets import SECRET_REF, SecretError, SecretResolver
from gateway.state import StateError, StateStore
from gateway.yamldoc import Problem

DURATION = re.compile(r"^(\d+)([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CommandError(Exception):
    """Ends the command with this message on stderr and exit status 1."""


def parse_duration(text: str) -> float:
    match = DURATION.match(text.strip())
    if not match:
        raise CommandError(f"invalid duration {text!r}: use a number and a unit, e.g. 30m, 12h, 7d")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


def timestamp(value: float | None) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds") if value else "-"


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


# --------------------------------------------------------------------------- config + secrets


def load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise CommandError(f"configuration in {Path(args.config).resolve()} has {len(exc.problems)} error(s)") from None


def resolve_secrets(config: Config) -> tuple[SecretResolver, list[str], list[Problem]]:
    """Resolve every referenced secret; problems name the connector file and field that references it."""
    resolver = SecretResolver(config.settings.secrets)
    values: list[str] = []
    problems: list[Problem] = []
    for connector in config.connectors.values():
        target = connector.target
        section, fields = (
            ("stdio.env", target.env) if isinstance(target, StdioTarget) else ("http.headers", target.headers)
        )
        for field, value in fields.items():
            for name in SECRET_REF.findall(value):
                where = f"{section}.{field}"
                try:
                    secret = resolver.resolve(name)
                except SecretError as exc:
                    problems.append(Problem(connector.source, where, str(exc)))
                    continue
                if len(secret) < MIN_SECRET_LENGTH:
                    problems.append(
                        Problem(
                            connector.source, where, f"secret {name!r} is shorter than {MIN_SECRET_LENGTH} characters"
                        )
                    )
                values.append(secret)
    return resolver, values, problems


# --------------------------------------------------------------------------- commands


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


def cmd_agent_add(args: argparse.Namespace) -> int:
    config = load(args)
    enclave = config.enclaves.get(args.enclave)
    if enclave is None:
        raise CommandError(f"no enclave {args.enclave!r}; known: {', '.join(sorted(config.enclaves)) or 'none'}")
    if args.name not in enclave.agents:
        raise CommandError(
            f"agent {args.name!r} is not listed in {enclave.source} (field 'agents'); add it there first"
        )
    expires_at = time.time() + parse_duration(args.expires) if args.expires else None
    token = tokens.mint()

    async def add(store: StateStore) -> None:
        await store.add_agent(args.name, enclave.name, tokens.token_hash(token), expires_at)

    with_store(config, add)
    notify_gateway(config)
    print(token)
    print(
        f"agent {args.name!r} added to enclave {enclave.name!r}"
        + (f", expires {timestamp(expires_at)}" if expires_at else "")
        + ". The token above is shown only once: store it now.",
        file=sys.stderr,
    )
    return 0


def cmd_agent_list(args: argparse.Namespace) -> int:
    config = load(args)

    async def agents(store: StateStore) -> list[Any]:
        return await store.agents()

    now = time.time()
    rows = [
        {
            "name": a.name,
            "enclave": a.enclave,
            "status": a.status(now),
            "created": timestamp(a.created_at),
            "expires": timestamp(a.expires_at),
        }
        for a in with_store(config, agents)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "enclave", "status", "created", "expires"])
    return 0


def cmd_agent_revoke(args: argparse.Namespace) -> int:
    config = load(args)

    async def revoke(store: StateStore) -> bool:
        return await store.revoke_agent(args.name)

    if not with_store(config, revoke):
        raise CommandError(f"no active agent {args.name!r} (see: enclave agent list)")
    applied = notify_gateway(config)
    print(f"agent {args.name!r} revoked" + ("; the running gateway applied it" if applied else ""), file=sys.stderr)
    return 0


def with_store(config: Config, action: Callable[[StateStore], Any]) -> Any:
    async def run() -> Any:
        async with StateStore.open(config.settings.state_dir) as store:
            return await action(store)

    try:
        return anyio.run(run)
    except StateError as exc:
        raise CommandError(str(exc)) from None


def notify_gateway(config: Config) -> bool:
    """Tell a running gateway to reload agents; True if one acknowledged."""
    reply = control.request(config.settings.state_dir, {"op": "reload-agents"})
    return bool(reply and reply.get("ok"))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enclave", description="An MCP gateway that contains AI agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        default=os.environ.get("ENCLAVE_CONFIG", "."),
        help="configuration directory holding gateway.yaml, connectors/ and enclaves/ (default: . or $ENCLAVE_CONFIG)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (MCP streamable HTTP, 127.0.0.1:8765 by default)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override listen.host/listen.port from gateway.yaml")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate the configuration and its secret references")
    check.set_defaults(func=cmd_check)

    agent = commands.add_parser("agent", help="mint, list and revoke agent tokens")
    agent_commands = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    add = agent_commands.add_parser("add", help="mint a token for an agent listed in an enclave (shown once)")
    add.add_argument("name")
    add.add_argument("--enclave", required=True)
    add.add_argument("--expires", metavar="DURATION", help="token lifetime, e.g. 12h or 30d (default: no expiry)")
    add.set_defaults(func=cmd_agent_add)
    listing = agent_commands.add_parser("list", help="list agents and the state of their tokens")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_agent_list)
    revoke = agent_commands.add_parser("revoke", help="revoke an agent's token (effective on its next request)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_agent_revoke)
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
