"""`enclave agent add|list|revoke`: agent tokens."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gateway import tokens
from gateway.cli.common import (
    CommandError,
    Commands,
    emit,
    load,
    notify_gateway,
    parse_duration,
    timestamp,
    with_store,
)
from gateway.config import Config
from gateway.state import StateStore


def mint_token(config: Config, name: str, enclave_name: str, expires_at: float | None = None) -> str:
    """A new token for an agent listed in the enclave, stored (as a hash) and applied by a running gateway; the
    returned token exists nowhere else."""
    enclave = config.enclaves.get(enclave_name)
    if enclave is None:
        raise CommandError(f"no enclave {enclave_name!r}; known: {', '.join(sorted(config.enclaves)) or 'none'}")
    if name not in enclave.agents:
        raise CommandError(f"agent {name!r} is not listed in {enclave.source} (field 'agents'); add it there first")
    token = tokens.mint()

    async def add(store: StateStore) -> None:
        await store.add_agent(name, enclave.name, tokens.token_hash(token), expires_at)

    with_store(config, add)
    notify_gateway(config)
    return token


def cmd_agent_add(args: argparse.Namespace) -> int:
    config = load(args)
    expires_at = time.time() + parse_duration(args.expires) if args.expires else None
    token = mint_token(config, args.name, args.enclave, expires_at)
    print(token)
    print(
        f"agent {args.name!r} added to enclave {args.enclave!r}"
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
    emit(rows, ["name", "enclave", "status", "created", "expires"], args.json)
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


def register(commands: Commands) -> None:
    agent = commands.add_parser("agent", help="mint, list and revoke agent tokens")
    actions = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="mint a token for an agent listed in an enclave (shown once)")
    add.add_argument("name")
    add.add_argument("--enclave", required=True)
    add.add_argument("--expires", metavar="DURATION", help="token lifetime, e.g. 12h or 30d (default: no expiry)")
    add.set_defaults(func=cmd_agent_add)
    listing = actions.add_parser("list", help="list agents and the state of their tokens")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_agent_list)
    revoke = actions.add_parser("revoke", help="revoke an agent's token (effective on its next request)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_agent_revoke)
