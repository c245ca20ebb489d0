"""`enclave agents` and `enclave audit`: which agents are running now, and what they did.

Both read the state database directly; SQLite's WAL lets them run while the gateway writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.audit_store import COLUMNS, AuditFilter, AuditStore
from gateway.cli.common import CommandError, Commands, emit, load, parse_duration, timestamp

T = TypeVar("T")
IDLE_TIMEOUT = 30 * 60  # the gateway ends a handshake-era session after 30 idle minutes (the SDK's default)
DECISIONS = ("allow", "deny", "error")
SESSION_COLUMNS = ["agent", "enclave", "client", "era", "process", "since", "last_call", "calls"]
AUDIT_COLUMNS = ["time", "agent", "enclave", "method", "target", "decision", "reason", "outcome", "latency_ms"]


def printable(value: Any) -> Any:
    """Text from agents (client names, tool names) with control characters escaped, for a terminal."""
    if not isinstance(value, str) or value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)


def cell(value: Any) -> Any:
    """A table cell: printable, "-" when unknown."""
    return "-" if value is None else printable(value)


def parse_moment(text: str, now: float) -> float:
    """A duration back from now (7d, 12h) or an ISO 8601 date or time (UTC unless it says otherwise)."""
    try:
        return now - parse_duration(text)
    except CommandError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"invalid time {text!r}: use a duration back from now (30m, 12h, 7d) or an ISO date such as 2026-11-20 "
            "or 2026-11-20T08:00:00Z"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def read(args: argparse.Namespace, action: Callable[[AuditStore], T]) -> T:
    """Run `action` on the audit tables of the configuration's state database."""
    state_dir = load(args).settings.state_dir
    try:
        with closing(AuditStore.open(state_dir)) as store:
            return action(store)
    except sqlite3.Error as exc:
        raise CommandError(f"cannot read the state database in {state_dir}: {exc}") from None


# -- enclave agents --------------------------------------------------------------------------


def cmd_agents(args: argparse.Namespace) -> int:
    now = time.time()
    sessions = read(args, lambda store: store.sessions(None if args.all else now - IDLE_TIMEOUT))
    rows = [
        {
            "agent": s["agent"],
            "enclave": s["enclave"],
            "client": f"{s['client_name'] or '-'}/{s['client_version'] or '-'}",
            "era": s["protocol_version"] or "-",
            "process": json.loads(s["process"]) if s["process"] else None,
            "session": s["session"],
            "since": timestamp(s["first_seen"]),
            "last_call": timestamp(s["last_seen"]),
            "calls": s["calls"],
            "status": _status(s, now),
        }
        for s in sessions
    ]
    if args.json:
        emit(rows, SESSION_COLUMNS, as_json=True)
        return 0
    from gateway.peers import summary  # (the attribution module brings uvicorn; only this table needs it)

    columns = [*SESSION_COLUMNS, "status"] if args.all else SESSION_COLUMNS
    table = [
        {
            **{k: cell(v) for k, v in row.items()},
            "process": cell(summary(row["process"])),
        }
        for row in rows
    ]
    emit(table, columns, as_json=False)
    return 0


def _status(session: dict[str, Any], now: float) -> str:
    if session["closed_at"] is not None:
        return "closed"
    return "live" if session["last_seen"] >= now - IDLE_TIMEOUT else "idle"


# -- enclave audit ---------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CommandError(f"--limit must be a positive number of rows, not {args.limit}")
    now = time.time()
    where = AuditFilter(
        agent=args.agent,
        enclave=args.enclave,
        tool=args.tool,
        decision=args.decision,
        since=parse_moment(args.since, now) if args.since else None,
        until=parse_moment(args.until, now) if args.until else None,
        limit=args.limit,
    )
    rows = [{"time": _iso(row["at"]), **row} for row in reversed(read(args, lambda store: store.query(where)))]
    if args.csv:
        writer = csv.DictWriter(sys.stdout, ["time", "id", *COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: printable(v) for k, v in row.items()} for row in rows)
    elif args.json:
        emit(rows, AUDIT_COLUMNS, as_json=True)
    else:
        emit([{k: cell(v) for k, v in row.items()} for row in rows], AUDIT_COLUMNS, as_json=False)
    return 0


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    verdict = read(args, AuditStore.verify)
    if not verdict.ok:
        raise CommandError(
            f"audit log is broken at row {verdict.bad_row}: {verdict.problem} "
            f"({verdict.rows} rows before it are intact)"
        )
    print(f"ok: {verdict.rows} rows")
    return 0


def register(commands: Commands) -> None:
    agents = commands.add_parser("agents", help="which agents are running now (live sessions)")
    agents.add_argument("--json", action="store_true")
    agents.add_argument("--all", action="store_true", help="also sessions that were closed or idle for 30 minutes")
    agents.set_defaults(func=cmd_agents)

    audit = commands.add_parser(
        "audit",
        help="what agents did: one row per request (newest last); `enclave audit verify` checks the hash chain",
    )
    audit.add_argument("--agent")
    audit.add_argument("--enclave")
    audit.add_argument("--tool", help="the tool, prompt or resource URI, as the agent named it")
    audit.add_argument("--decision", choices=DECISIONS)
    audit.add_argument("--since", metavar="WHEN", help="7d, 12h, 30m back from now, or an ISO date/time (UTC)")
    audit.add_argument("--until", metavar="WHEN", help="same forms as --since")
    audit.add_argument("--limit", type=int, default=100, metavar="N", help="the newest N matching rows (default 100)")
    output = audit.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--csv", action="store_true")
    audit.set_defaults(func=cmd_audit)
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    verify = actions.add_parser("verify", help="check that no audit row was edited, deleted or reordered")
    verify.set_defaults(func=cmd_audit_verify)
