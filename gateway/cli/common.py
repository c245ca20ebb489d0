"""What every command shares: loading config, the state store, error and output conventions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from gateway import control
from gateway.config import Config, ConfigError, duration_seconds, load_config
from gateway.state import StateError, StateStore

Commands = argparse._SubParsersAction  # the `add_subparsers()` object each module registers on


class CommandError(Exception):
    """Ends the command with this message on stderr and exit status 1."""


def parse_duration(text: str) -> float:
    seconds = duration_seconds(text)
    if seconds is None:
        raise CommandError(f"invalid duration {text!r}: use a number and a unit, e.g. 30m, 12h, 7d")
    return seconds


def timestamp(value: float | None) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds") if value else "-"


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise CommandError(f"configuration in {Path(args.config).resolve()} has {len(exc.problems)} error(s)") from None


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


def emit(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """A listing: a table for people, or JSON with --json."""
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, columns)
