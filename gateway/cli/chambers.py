"""`enclave grant|grants|revoke-grant` and `enclave approvals|approve|deny`: chamber authorizations.

Grants are read by the gateway at call time, so creating or revoking one needs no notification; deciding
an approval request tells a running gateway, so that the call waiting for it proceeds (or fails) at once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway import control
from gateway.cli.common import CommandError, Commands, emit, load, parse_duration, timestamp, with_store
from gateway.config import Chamber, Config
from gateway.grants import Approval, Grant, GrantStore, argument_digest
from gateway.state import StateStore

T = TypeVar("T")
DEFAULT_TTL = 15 * 60
GRANT_COLUMNS = ["id", "agent", "chamber", "target", "args", "uses", "expires", "status", "reason"]
APPROVAL_COLUMNS = ["id", "mode", "agent", "chamber", "target", "arguments", "status", "expires", "decided_by"]
MAX_TABLE_ARGUMENTS = 60


def with_grants(config: Config, action: Callable[[GrantStore], Awaitable[T]]) -> T:
    async def run(state: StateStore) -> T:
        store = GrantStore(state.db)
        await store.create_tables()
        return await action(store)

    return with_store(config, run)


def seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


# -- grants ------------------------------------------------------------------------------------


def cmd_grant(args: argparse.Namespace) -> int:
    config = load(args)
    enclave = config.enclave_of(args.agent)
    if enclave is None:
        raise CommandError(f"agent {args.agent!r} is not listed in any enclave (field 'agents' of enclaves/*.yaml)")
    chamber = enclave.chambers.get(args.chamber)
    if chamber is None:
        known = ", ".join(sorted(enclave.chambers)) or "none"
        raise CommandError(
            f"enclave {enclave.name!r} has no chamber {args.chamber!r} (its chambers: {known}; see {enclave.source})"
        )
    target = _target(args, chamber)
    digest = _argument_digest(args)
    ttl = parse_duration(args.ttl) if args.ttl else min(DEFAULT_TTL, chamber.max_grant_ttl)
    if ttl > chamber.max_grant_ttl:
        raise CommandError(
            f"--ttl {args.ttl} is longer than chamber {chamber.name!r} allows: its max_grant_ttl is "
            f"{seconds_text(chamber.max_grant_ttl)} (in {enclave.source}); ask for less"
        )
    uses = args.uses
    if uses is not None and uses < 1:
        raise CommandError("--uses must be at least 1")
    if chamber.single_use:
        if uses not in (None, 1):
            raise CommandError(f"chamber {chamber.name!r} is single_use: a grant authorizes exactly one call")
        uses = 1
    now = time.time()

    async def add(store: GrantStore) -> str:
        return await store.add_grant(
            agent=args.agent,
            enclave=enclave.name,
            chamber=chamber.name,
            target=target,
            args_digest=digest,
            uses=uses,
            created_at=now,
            expires_at=now + ttl,
            reason=args.reason,
            created_by=getpass.getuser(),
        )

    grant_id = with_grants(config, add)
    print(grant_id)
    scope = f"{target}" + (" with exactly those arguments" if digest else "") if target else "anything"
    times = "once" if uses == 1 else (f"{uses} times" if uses else "any number of times")
    print(
        f"grant {grant_id}: agent {args.agent!r} may call {scope} in chamber {chamber.name!r} {times}, "
        f"until {timestamp(now + ttl)}. Revoke it with: enclave revoke-grant {grant_id}",
        file=sys.stderr,
    )
    return 0


def _target(args: argparse.Namespace, chamber: Chamber) -> str | None:
    if args.tool is not None and not chamber.tools.matches(args.tool):
        raise CommandError(
            f"tool {args.tool!r} is not in chamber {chamber.name!r} (its tools: {_list(chamber.tools.items)})"
        )
    if args.resource is not None and not chamber.resources.matches(args.resource):
        raise CommandError(
            f"resource {args.resource!r} is not in chamber {chamber.name!r} "
            f"(its resources: {_list(chamber.resources.items)})"
        )
    return args.tool or args.resource


def _argument_digest(args: argparse.Namespace) -> str | None:
    if args.args is None:
        return None
    if args.tool is None:
        raise CommandError("--args binds the arguments of one tool call: give --tool too")
    try:
        arguments = json.loads(args.args)
    except ValueError as exc:
        raise CommandError(f"--args is not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise CommandError('--args must be a JSON object, e.g. \'{"part_id": "P-100"}\'')
    return argument_digest(arguments)


def _list(items: tuple[str, ...]) -> str:
    return ", ".join(items) or "none"


def grant_row(grant: Grant, now: float, as_json: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": grant.id,
        "agent": grant.agent,
        "enclave": grant.enclave,
        "chamber": grant.chamber,
        "target": grant.target if as_json else grant.target or "*",
        "args": ("bound" if grant.args_digest else "any"),
        "uses": grant.uses_left if as_json else ("unlimited" if grant.uses_left is None else f"{grant.uses_left} left"),
        "used": grant.used,
        "created": timestamp(grant.created_at),
        "expires": timestamp(grant.expires_at),
        "status": grant.status(now),
        "reason": grant.reason if as_json else grant.reason or "-",
        "created_by": grant.created_by,
    }
    if as_json:
        row["args_digest"] = grant.args_digest
    return row


def cmd_grants(args: argparse.Namespace) -> int:
    config = load(args)
    grants = with_grants(config, lambda store: store.grants(agent=args.agent, chamber=args.chamber))
    now = time.time()
    rows = [grant_row(g, now, args.json) for g in grants if args.all or g.status(now) == "active"]
    emit(rows, GRANT_COLUMNS, args.json)
    return 0


def cmd_revoke_grant(args: argparse.Namespace) -> int:
    config = load(args)
    if not with_grants(config, lambda store: store.revoke_grant(args.id, time.time())):
        raise CommandError(f"no unrevoked grant {args.id!r} (see: enclave grants --all)")
    print(f"grant {args.id} revoked: the gateway refuses its next use", file=sys.stderr)
    return 0


# -- approvals ---------------------------------------------------------------------------------


def approval_row(approval: Approval, now: float, as_json: bool) -> dict[str, Any]:
    arguments: Any = approval.arguments
    if as_json:
        arguments = json.loads(arguments)
    elif len(arguments) > MAX_TABLE_ARGUMENTS:
        arguments = arguments[: MAX_TABLE_ARGUMENTS - 1] + "…"
    return {
        "id": approval.id,
        "mode": approval.kind,
        "agent": approval.agent,
        "enclave": approval.enclave,
        "chamber": approval.chamber,
        "target": approval.target,
        "arguments": arguments,
        "status": approval.current_status(now),
        "created": timestamp(approval.created_at),
        "expires": timestamp(approval.expires_at),
        "decided_by": approval.decided_by if as_json else approval.decided_by or "-",
    }


def cmd_approvals(args: argparse.Namespace) -> int:
    config = load(args)
    approvals = with_grants(config, lambda store: store.approvals())
    now = time.time()
    rows = [approval_row(a, now, args.json) for a in approvals if args.all or a.current_status(now) == "pending"]
    emit(rows, APPROVAL_COLUMNS, args.json)
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    config = load(args)
    approve = args.command == "approve"
    operator = getpass.getuser()

    async def decide(store: GrantStore) -> Approval:
        approval = await store.approval(args.id)
        if approval is None or approval.kind == "continuation":
            raise CommandError(f"no approval request {args.id!r} (see: enclave approvals)")
        if approval.kind != "operator":
            raise CommandError(f"approval request {args.id} is answered by the agent's own user, not by an operator")
        enclave = config.enclaves.get(approval.enclave)
        chamber = enclave.chambers.get(approval.chamber) if enclave is not None else None
        if chamber is not None and chamber.approvers and operator not in chamber.approvers:
            raise CommandError(
                f"user {operator!r} is not an approver of chamber {chamber.name!r} (approvers: "
                f"{_list(chamber.approvers)})"
            )
        if not await store.decide(approval.id, approve=approve, by=operator, now=time.time()):
            status = approval.current_status(time.time())
            raise CommandError(f"approval request {args.id} is no longer open (it is {status})")
        return approval

    approval = with_grants(config, decide)
    reply = control.request(config.settings.state_dir, {"op": "approval-decided", "id": approval.id})
    told = " and the gateway was told" if reply and reply.get("ok") else ""
    print(
        f"{'approved' if approve else 'refused'}: {approval.agent} calling {approval.target} in chamber "
        f"{approval.chamber!r} with {approval.arguments}{told}"
        + (" (a retry of the same call uses it once)" if approve else ""),
        file=sys.stderr,
    )
    return 0


def register(commands: Commands) -> None:
    grant = commands.add_parser("grant", help="let an agent call into a chamber (prints the grant id)")
    grant.add_argument("agent")
    grant.add_argument("chamber")
    target = grant.add_mutually_exclusive_group()
    target.add_argument("--tool", help="only this tool (its name as agents see it)")
    target.add_argument("--resource", metavar="URI", help="only this resource")
    grant.add_argument("--args", metavar="JSON", help="only a call with exactly these arguments (with --tool)")
    grant.add_argument("--ttl", metavar="DURATION", help="lifetime, e.g. 15m (default: 15m or max_grant_ttl if less)")
    grant.add_argument("--uses", type=int, metavar="N", help="number of calls (default: unlimited, 1 if single_use)")
    grant.add_argument("--reason", metavar="TEXT", help="why (shown in `enclave grants`)")
    grant.set_defaults(func=cmd_grant)

    grants = commands.add_parser("grants", help="list chamber grants (active ones unless --all)")
    grants.add_argument("--agent")
    grants.add_argument("--chamber")
    grants.add_argument("--all", action="store_true", help="also expired, used up and revoked grants")
    grants.add_argument("--json", action="store_true")
    grants.set_defaults(func=cmd_grants)

    revoke = commands.add_parser("revoke-grant", help="revoke a grant (effective on its next use)")
    revoke.add_argument("id")
    revoke.set_defaults(func=cmd_revoke_grant)

    approvals = commands.add_parser("approvals", help="list requests to approve single chamber calls (pending ones)")
    approvals.add_argument("--all", action="store_true", help="also decided, used and expired requests")
    approvals.add_argument("--json", action="store_true")
    approvals.set_defaults(func=cmd_approvals)

    for verb, text in (("approve", "approve one pending chamber call"), ("deny", "refuse one pending chamber call")):
        decide = commands.add_parser(verb, help=text)
        decide.add_argument("id", help="the request id (see: enclave approvals)")
        decide.set_defaults(func=cmd_decide)
