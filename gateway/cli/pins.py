"""`enclave pins` and `enclave approve-tool`: the tool definitions the gateway trusts (gateway.pins).

A tool whose upstream definition changed since it was pinned is withheld from every agent until an operator
reviews the new definition (`enclave pins --json` shows both) and accepts it with `approve-tool`, which
writes the pin, audits it and tells a running gateway, so the tool is back on the next request.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from contextlib import closing
from typing import Any, TypeVar

from gateway import control
from gateway.audit_store import AuditStore, event_row
from gateway.cli.common import CommandError, Commands, emit, load, timestamp, with_store
from gateway.cli.governance import cell
from gateway.config import Config
from gateway.pins import Definition, Pin, PinStore
from gateway.state import StateStore

T = TypeVar("T")
COLUMNS = ["connector", "tool", "status", "hash", "flags", "pinned", "by"]


def with_pins(config: Config, action: Callable[[PinStore], Awaitable[T]]) -> T:
    async def run(state: StateStore) -> T:
        store = PinStore(state.db)
        await store.create_tables()
        return await action(store)

    return with_store(config, run)


def pin_row(pin: Pin, as_json: bool) -> dict[str, Any]:
    status = "changed" if pin.changed_hash is not None else "pinned"
    if as_json:
        return {
            "connector": pin.connector,
            "tool": pin.tool,
            "status": status,
            "hash": pin.hash,
            "flags": list(pin.flags),
            "pinned": timestamp(pin.pinned_at),
            "by": pin.pinned_by,
            "definition": json.loads(pin.definition),
            "changed_hash": pin.changed_hash,
            "changed_flags": list(pin.changed_flags),
            "changed": timestamp(pin.changed_at) if pin.changed_at else None,
            "changed_definition": json.loads(pin.changed_definition) if pin.changed_definition else None,
        }
    flags = ", ".join(pin.flags) or "-"
    hashes = pin.hash[:12]
    if pin.changed_hash is not None:
        hashes += f" -> {pin.changed_hash[:12]}"
        flags += f" -> {', '.join(pin.changed_flags) or '-'}"
    return {
        "connector": cell(pin.connector),
        "tool": cell(pin.tool),
        "status": status,
        "hash": hashes,
        "flags": flags,
        "pinned": timestamp(pin.pinned_at),
        "by": cell(pin.pinned_by),
    }


def cmd_pins(args: argparse.Namespace) -> int:
    config = load(args)
    pins = with_pins(config, lambda store: store.pins(args.connector))
    emit([pin_row(pin, args.json) for pin in pins], COLUMNS, args.json)
    return 0


def cmd_approve_tool(args: argparse.Namespace) -> int:
    config = load(args)
    operator = getpass.getuser()

    async def pending(store: PinStore) -> Definition:
        pin = next((p for p in await store.pins(args.connector) if p.tool == args.tool), None)
        if pin is None:
            raise CommandError(f"connector {args.connector!r} has no pinned tool {args.tool!r} (see: enclave pins)")
        if pin.changed_hash is None or pin.changed_definition is None:
            raise CommandError(
                f"tool {args.tool!r} of connector {args.connector!r} has no changed definition to approve; "
                f"it is served with its pinned definition {pin.hash[:12]}"
            )
        if args.hash and not pin.changed_hash.startswith(args.hash):
            raise CommandError(
                f"the definition waiting for approval is {pin.changed_hash[:12]}, not {args.hash}: the upstream "
                "changed it again; review it with: enclave pins --json --connector " + args.connector
            )
        return Definition(pin.tool, pin.changed_definition, pin.changed_hash, pin.changed_flags)

    definition = with_pins(config, pending)
    about = {"connector": args.connector, "target": args.tool, "upstream_target": args.tool}
    row = event_row("tool.approved", "allow", f"definition {definition.hash[:12]} approved by {operator}", **about)
    with closing(AuditStore.open(config.settings.state_dir)) as audit:  # audited before it takes effect
        audit.append([row], [], [])
    with_pins(config, lambda store: store.pin(args.connector, definition, operator))
    message = {"op": "tool-approved", "connector": args.connector, "tool": args.tool}
    reply = control.request(config.settings.state_dir, message)
    applied = "; the running gateway serves it again" if reply and reply.get("ok") else ""
    flagged = f" (flagged: {', '.join(definition.flags)})" if definition.flags else ""
    print(f"approved definition {definition.hash[:12]} of tool {args.tool!r}{flagged}{applied}", file=sys.stderr)
    return 0


def register(commands: Commands) -> None:
    pins = commands.add_parser(
        "pins", help="the tool definitions the gateway trusts, and those withheld because they changed upstream"
    )
    pins.add_argument("--connector", help="only this connector's tools")
    pins.add_argument("--json", action="store_true", help="also the definitions themselves (pinned and changed)")
    pins.set_defaults(func=cmd_pins)

    approve = commands.add_parser(
        "approve-tool", help="trust the changed definition of a withheld tool (review it first: enclave pins --json)"
    )
    approve.add_argument("connector")
    approve.add_argument("tool", help="the tool's name at the upstream (as `enclave pins` lists it)")
    approve.add_argument(
        "--hash", metavar="PREFIX", help="approve only if the waiting definition still has this hash (prefix)"
    )
    approve.set_defaults(func=cmd_approve_tool)
