"""Tool-definition pins: the defence against rug pulls (an upstream that changes a tool after it was trusted).

The first time the gateway sees a tool of a connector, its definition is pinned (trust on first use): the
SHA-256 of the canonical JSON of what a model reads and relies on, PINNED_FIELDS (name, title, description,
inputSchema, outputSchema, annotations). When the upstream later serves a different definition, the tool is
withheld from every enclave: it is missing from tools/list, and a call to it gets the very reply a name that
exists nowhere gets (no oracle), audited with reason `definition_changed`, and never reaches the upstream;
until an operator accepts the new definition with `enclave approve-tool CONNECTOR TOOL`. Pins are checked
where enclave views are built (gateway.view), so every path (SDK, fast path, `enclave reach`) sees the same.

Every definition is screened for typical prompt-injection markers (MARKERS) when it is pinned or changes.
A flagged definition is logged, audited and shown by `enclave pins`; it is not withheld (the markers are
heuristics, and containment is the enclave's and the chamber's job), so an operator reviews it.

Each step is an audit row: `tool.pinned` (first use), `tool.changed` (withheld), `tool.restored` (the upstream
serves the pinned definition again), `tool.approved` (written by the command line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import anyio

from gateway.audit_store import canonical_json
from gateway.state import StateStore

if TYPE_CHECKING:
    import mcp_types as types

    from gateway.audit import AuditLog

logger = logging.getLogger(__name__)

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
FIRST_USE = "first use"

# Typical markers of instructions aimed at the model rather than a description for it; matched against every
# string (keys included) of a definition. Kept small and specific: each one is a reason to read the definition.
MARKERS: dict[str, re.Pattern[str]] = {
    # <IMPORTANT>, <system>, <instructions> ...: the classic tool-poisoning wrapper
    "instruction_tag": re.compile(r"<\s*/?\s*(important|system|instructions?|admin|secret)\b", re.IGNORECASE),
    # "ignore (all) previous instructions" and its variants
    "override_instructions": re.compile(
        r"\b(ignore|disregard|forget)\b[^.\n]{0,30}\b(previous|prior|above|earlier|all)\b[^.\n]{0,20}"
        r"\b(instructions?|rules|prompts?)\b",
        re.IGNORECASE,
    ),
    # "do not tell the user", "without informing the user"
    "conceal_from_user": re.compile(
        r"\b(do not|don'?t|never|without)\s+(tell|inform|mention|show|alert)(ing)?\b[^.\n]{0,20}\bthe user\b",
        re.IGNORECASE,
    ),
    # what poisoned descriptions ask models to read and pass on
    "sensitive_path": re.compile(r"~/\.ssh|\bid_(rsa|ed25519)\b|\.aws/credentials|\bmcp\.json\b|/etc/(passwd|shadow)"),
    # zero-width, bidi control and Unicode tag characters: text a person does not see but a model reads
    "hidden_characters": re.compile(
        "[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]"
    ),
    # ANSI escapes and other control characters (line breaks and tabs are fine)
    "control_characters": re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"),
    # a long base64 run: an encoded payload the reader cannot review
    "encoded_blob": re.compile(r"[A-Za-z0-9+/]{80,}={0,2}"),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_pins (
    connector          TEXT NOT NULL,
    tool               TEXT NOT NULL,   -- the upstream's name
    hash               TEXT NOT NULL,   -- sha256 of the canonical JSON of the trusted definition
    definition         TEXT NOT NULL,   -- that canonical JSON, brokered secrets redacted (for review)
    flags              TEXT NOT NULL,   -- JSON list of the MARKERS found in it
    pinned_at          REAL NOT NULL,
    pinned_by          TEXT NOT NULL,   -- 'first use', or the OS user who approved the definition
    changed_hash       TEXT,            -- the different definition the upstream served (NULL: none)
    changed_definition TEXT,
    changed_flags      TEXT,
    changed_at         REAL,
    PRIMARY KEY (connector, tool)
);
"""
_COLUMNS = (
    "connector, tool, hash, definition, flags, pinned_at, pinned_by, changed_hash, changed_definition, "
    "changed_flags, changed_at"
)


@dataclass(frozen=True)
class Definition:
    """A tool definition as pinned: the hash of its canonical JSON, that JSON as shown (redacted), its markers."""

    tool: str
    shown: str
    hash: str
    flags: tuple[str, ...]

    @classmethod
    def of(cls, tool: types.Tool, redact: Callable[[str], str] = str) -> Definition:
        """`redact` scrubs the stored copy: an upstream may put its credential in a description (the hash is of
        the definition as served)."""
        data = tool.model_dump(by_alias=True, exclude_none=True, mode="json")
        canonical = canonical_json({name: data[name] for name in PINNED_FIELDS if name in data})
        return cls(tool.name, redact(canonical), hashlib.sha256(canonical.encode()).hexdigest(), markers(data))


def markers(definition: Any) -> tuple[str, ...]:
    """The MARKERS found in any string of a definition."""
    texts = list(_strings(definition))
    return tuple(name for name, pattern in MARKERS.items() if any(pattern.search(text) for text in texts))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclass(frozen=True)
class Pin:
    connector: str
    tool: str
    hash: str
    definition: str
    flags: tuple[str, ...]
    pinned_at: float
    pinned_by: str
    changed_hash: str | None = None
    changed_definition: str | None = None
    changed_flags: tuple[str, ...] = ()
    changed_at: float | None = None

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> Pin:
        values = list(row)
        values[4] = tuple(json.loads(values[4]))
        values[9] = tuple(json.loads(values[9])) if values[9] else ()
        return cls(*values)


class PinStore:
    """The `tool_pins` table."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db

    async def create_tables(self) -> None:
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def pins(self, connector: str | None = None) -> list[Pin]:
        query = f"SELECT {_COLUMNS} FROM tool_pins"
        args: tuple[str, ...] = ()
        if connector is not None:
            query, args = query + " WHERE connector = ?", (connector,)
        async with self._db.execute(query + " ORDER BY connector, tool", args) as cursor:
            return [Pin.from_row(row) async for row in cursor]

    async def pin(self, connector: str, definition: Definition, by: str) -> Pin:
        """Trust `definition` (first use, or an operator's approval): it replaces the pin and any pending change."""
        pin = Pin(connector, definition.tool, definition.hash, definition.shown, definition.flags, time.time(), by)
        await self._db.execute(
            "INSERT OR REPLACE INTO tool_pins (connector, tool, hash, definition, flags, pinned_at, pinned_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (connector, pin.tool, pin.hash, pin.definition, json.dumps(pin.flags), pin.pinned_at, by),
        )
        await self._db.commit()
        return pin

    async def record_change(self, pin: Pin, definition: Definition | None) -> Pin:
        """The upstream serves `definition` instead of the pinned one (None: the pinned one again)."""
        if definition is None:
            changed = replace(pin, changed_hash=None, changed_definition=None, changed_flags=(), changed_at=None)
        else:
            changed = replace(
                pin,
                changed_hash=definition.hash,
                changed_definition=definition.shown,
                changed_flags=definition.flags,
                changed_at=time.time(),
            )
        await self._db.execute(
            "UPDATE tool_pins SET changed_hash = ?, changed_definition = ?, changed_flags = ?, changed_at = ? "
            "WHERE connector = ? AND tool = ?",
            (
                changed.changed_hash,
                changed.changed_definition,
                json.dumps(changed.changed_flags) if definition is not None else None,
                changed.changed_at,
                pin.connector,
                pin.tool,
            ),
        )
        await self._db.commit()
        return changed


class ToolPins:
    """The gateway's pins, in memory, written through to the state database.

    With `audit` None it only inspects (the `enclave reach` command): a new tool passes (the gateway would pin
    it), a changed one is withheld, and nothing is written. `redact` scrubs the definitions it stores.
    """

    def __init__(self, audit: AuditLog | None, redact: Callable[[str], str] = str):
        self._audit = audit
        self._redact = redact
        self._store: PinStore | None = None
        self._pins: dict[tuple[str, str], Pin] = {}
        self._withheld: set[tuple[str, str]] = set()
        self._lock = anyio.Lock()

    @asynccontextmanager
    async def running(self, state_dir: Path) -> AsyncIterator[None]:
        """Load the pins and hold the database connection (until then every listing fails: fail closed)."""
        async with StateStore.open(state_dir) as state:
            store = PinStore(state.db)
            await store.create_tables()
            self._pins = {(pin.connector, pin.tool): pin for pin in await store.pins()}
            self._store = store
            try:
                yield
            finally:
                self._store = None

    def withheld(self, connector: str, tool: str) -> bool:
        """Whether the upstream's current definition of `tool` differs from its pin (so it is hidden)."""
        return (connector, tool) in self._withheld

    async def approved(self, connector: str, tools: list[types.Tool]) -> list[types.Tool]:
        """The tools whose definition matches its pin. A new tool is pinned; a changed one is recorded and left
        out. Raises if the pins cannot be read or written (the caller then lists nothing of the connector)."""
        if self._store is None:
            raise RuntimeError("the tool pins are not loaded")
        async with self._lock:
            kept = []
            for tool in tools:
                definition = Definition.of(tool, self._redact)
                key = (connector, tool.name)
                pin = self._pins.get(key)
                if pin is None and self._audit is not None:
                    pin = self._pins[key] = await self._first_use(connector, definition)
                if pin is None or pin.hash == definition.hash:
                    self._withheld.discard(key)
                    if pin is not None and pin.changed_hash is not None and self._audit is not None:
                        self._pins[key] = await self._restored(pin)
                    kept.append(tool)
                    continue
                self._withheld.add(key)
                if pin.changed_hash != definition.hash and self._audit is not None:
                    self._pins[key] = await self._changed(pin, definition)
            return kept

    async def refresh(self, connector: str, tool: str) -> None:
        """Re-read one pin (the command line approved a new definition); the caller rebuilds the views."""
        if self._store is None:
            return
        async with self._lock:
            for pin in await self._store.pins(connector):
                if pin.tool == tool:
                    self._pins[connector, tool] = pin
                    logger.info("connector %s: definition %s of tool %r approved", connector, pin.hash[:12], tool)

    async def _first_use(self, connector: str, definition: Definition) -> Pin:
        assert self._store is not None and self._audit is not None
        pin = await self._store.pin(connector, definition, FIRST_USE)
        reason = "first_use"
        if definition.flags:
            reason += "; flagged: " + ", ".join(definition.flags)
            logger.warning(
                "connector %s: tool %r pinned, but its definition has injection markers (%s); review it with "
                "`enclave pins --connector %s`",
                connector,
                definition.tool,
                ", ".join(definition.flags),
                connector,
            )
        await self._audit.record_event("tool.pinned", "allow", reason, **_about(connector, definition.tool))
        return pin

    async def _changed(self, pin: Pin, definition: Definition) -> Pin:
        assert self._store is not None and self._audit is not None
        changed = await self._store.record_change(pin, definition)
        flagged = f"; flagged: {', '.join(definition.flags)}" if definition.flags else ""
        logger.warning(
            "connector %s: the definition of tool %r changed (%s -> %s%s); it is withheld from every enclave until "
            "`enclave approve-tool %s %s`",
            pin.connector,
            pin.tool,
            pin.hash[:12],
            definition.hash[:12],
            flagged,
            pin.connector,
            pin.tool,
        )
        await self._audit.record_event(
            "tool.changed", "deny", "definition_changed" + flagged, **_about(pin.connector, pin.tool)
        )
        return changed

    async def _restored(self, pin: Pin) -> Pin:
        assert self._store is not None and self._audit is not None
        restored = await self._store.record_change(pin, None)
        logger.warning("connector %s: tool %r has its pinned definition again; served", pin.connector, pin.tool)
        await self._audit.record_event(
            "tool.restored", "allow", "pinned_definition_again", **_about(pin.connector, pin.tool)
        )
        return restored


def _about(connector: str, tool: str) -> dict[str, str]:
    """The audit columns of a pin event (target: the upstream's name; enclaves may show it renamed)."""
    return {"connector": connector, "target": tool, "upstream_target": tool}
