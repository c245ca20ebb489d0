"""The audit log's tables in the state database: a hash-chained, append-only `audit` table and `sessions`.

Each audit row stores `prev_hash` and `row_hash = sha256(prev_hash || canonical JSON of the row)`, where the
canonical JSON holds the row's non-null columns (not its id), keys sorted, ASCII only; so a column added
later leaves old rows verifiable. `audit_head` holds the id and hash of the last row, written in the same
transaction, so that deleting the last rows is caught as well. Triggers refuse UPDATE and DELETE on `audit`.

`sessions` has one row per agent session: the `Mcp-Session-Id` of a handshake-era session or, for stateless
requests (2026-07-28 era), `stateless:CLIENT/VERSION[@PID]` (PID: the verified local process, when known). It is
kept up to date in the same transaction as the audit rows of the calls it counts.

This module imports no server code, so the command line reads the log without loading the gateway.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.state import DB_FILE, PRAGMAS
from gateway.tokens import ensure_state_dir

GENESIS = "0" * 64
STATELESS_PREFIX = "stateless:"

# Column -> Python type; values are coerced to it before hashing, so what is read back hashes the same.
COLUMNS: dict[str, type] = {
    "at": float,
    "agent": str,
    "enclave": str,
    "session_id": str,
    "client_name": str,
    "client_version": str,
    "protocol_version": str,
    "process": str,  # JSON text
    "method": str,
    "request_id": str,
    "connector": str,
    "target": str,
    "upstream_target": str,
    "args_digest": str,
    "args_raw": str,  # JSON text, redacted; only for enclaves with audit.raw_arguments
    "token_fingerprint": str,  # authentication failures only
    "decision": str,
    "reason": str,
    "chamber": str,
    "grant_id": str,
    "outcome": str,
    "error_code": int,
    "latency_ms": float,
    "bytes_in": int,
    "bytes_out": int,
    "trace_id": str,
    "span_id": str,
    "correlation_id": str,
}
_NOT_NULL = {"at", "method", "decision"}
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}
_COLUMN_LIST = ", ".join(COLUMNS)
_COLUMN_DEFS = ",\n    ".join(
    f"{name} {_SQL_TYPES[kind]}{' NOT NULL' if name in _NOT_NULL else ''}" for name, kind in COLUMNS.items()
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY,
    {_COLUMN_DEFS},
    prev_hash TEXT NOT NULL,
    row_hash  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_agent_at ON audit (agent, at);
CREATE INDEX IF NOT EXISTS audit_enclave_at ON audit (enclave, at);
CREATE INDEX IF NOT EXISTS audit_target_at ON audit (target, at);
CREATE INDEX IF NOT EXISTS audit_decision_at ON audit (decision, at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS audit_head (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    id   INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    agent            TEXT NOT NULL,
    session          TEXT NOT NULL,
    enclave          TEXT NOT NULL,
    client_name      TEXT,
    client_version   TEXT,
    protocol_version TEXT,
    process          TEXT,
    first_seen       REAL NOT NULL,
    last_seen        REAL NOT NULL,
    calls            INTEGER NOT NULL,
    closed_at        REAL,
    PRIMARY KEY (agent, session)
);
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen);
"""

_INSERT_ROW = (
    f"INSERT INTO audit (id, {_COLUMN_LIST}, prev_hash, row_hash) "
    f"VALUES (:id, {', '.join(':' + name for name in COLUMNS)}, :prev_hash, :row_hash)"
)
_SET_HEAD = (
    "INSERT INTO audit_head (one, id, hash) VALUES (1, ?, ?) ON CONFLICT (one) DO UPDATE SET id = excluded.id, "
    "hash = excluded.hash"
)
_TOUCH_SESSION = """
INSERT INTO sessions (agent, session, enclave, client_name, client_version, protocol_version, process,
                      first_seen, last_seen, calls)
VALUES (:agent, :session, :enclave, :client_name, :client_version, :protocol_version, :process,
        :first_seen, :last_seen, :calls)
ON CONFLICT (agent, session) DO UPDATE SET
    last_seen = max(last_seen, excluded.last_seen),
    calls = calls + excluded.calls,
    client_name = coalesce(excluded.client_name, client_name),
    client_version = coalesce(excluded.client_version, client_version),
    process = coalesce(excluded.process, process)
"""
_CLOSE_SESSION = "UPDATE sessions SET closed_at = ? WHERE agent = ? AND session = ? AND closed_at IS NULL"
_SESSION_COLUMNS = (
    "agent, session, enclave, client_name, client_version, protocol_version, process, first_seen, last_seen, calls, "
    "closed_at"
)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def typed_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """A full audit row (every column, None where unknown) with each value of its column's type."""
    return {
        name: None if (value := values.get(name)) is None else _text(value) if kind is str else kind(value)
        for name, kind in COLUMNS.items()
    }


def event_row(method: str, decision: str, reason: str, **columns: Any) -> dict[str, Any]:
    """The row of a gateway event that is no agent's request: a configuration reload (`config.reload`), a tool
    definition pinned, changed or approved (`tool.pinned|changed|restored|approved`, gateway.pins)."""
    return typed_row({"at": time.time(), "method": method, "decision": decision, "reason": reason, **columns})


def _text(value: Any) -> str:
    """Text SQLite can store: a lone surrogate (JSON allows one, UTF-8 does not) is kept as an escape."""
    text = str(value)
    if text.isascii():  # most values: no need to try the encoding
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    content = canonical_json({name: row[name] for name in COLUMNS if row[name] is not None})
    return hashlib.sha256((prev_hash + content).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class SessionTouch:
    """One recorded call in a session."""

    agent: str
    session: str
    enclave: str
    client_name: str | None
    client_version: str | None
    protocol_version: str | None
    process: str | None
    at: float


@dataclass(frozen=True)
class SessionEnd:
    agent: str
    session: str
    at: float


@dataclass(frozen=True)
class AuditFilter:
    agent: str | None = None
    enclave: str | None = None
    tool: str | None = None
    decision: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: the number of rows checked and, if the chain is broken, where and how."""

    rows: int
    bad_row: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


class AuditStore:
    """The audit and sessions tables on one connection of their own.

    Synchronous on purpose: the gateway's writer runs a whole batch (`append`) in one worker-thread call,
    and the command line needs no event loop. Use from one thread at a time.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    @classmethod
    def open(cls, state_dir: Path, durability: str = "full", auto_checkpoint_pages: int | None = None) -> AuditStore:
        """`auto_checkpoint_pages`: the size of the write-ahead log at which a commit on this connection copies it
        into the database before it returns (SQLite's default, 1,000 pages, unless given)."""
        path = ensure_state_dir(state_dir) / DB_FILE
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # transactions are explicit
        for pragma in PRAGMAS:
            db.execute(pragma)
        db.execute(f"PRAGMA synchronous={'NORMAL' if durability == 'normal' else 'FULL'}")
        if auto_checkpoint_pages is not None:
            db.execute(f"PRAGMA wal_autocheckpoint={int(auto_checkpoint_pages)}")
        path.chmod(0o600)
        db.executescript(SCHEMA)
        return cls(db)

    def close(self) -> None:
        self.db.close()

    # -- writing -------------------------------------------------------------------------------

    def append(self, rows: list[dict[str, Any]], touches: list[SessionTouch], ends: list[SessionEnd]) -> None:
        """Chain and insert `rows` (typed_row dicts), update sessions: one transaction, one commit.

        The head is read inside the write transaction, so two writers on one database cannot fork the chain.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                head = db.execute("SELECT id, hash FROM audit_head").fetchone()
                last_id, prev_hash = head if head is not None else (0, GENESIS)
                chained = []
                for row in rows:
                    last_id += 1
                    row_hash = chain_hash(prev_hash, row)
                    chained.append({**row, "id": last_id, "prev_hash": prev_hash, "row_hash": row_hash})
                    prev_hash = row_hash
                db.executemany(_INSERT_ROW, chained)
                db.execute(_SET_HEAD, (last_id, prev_hash))
            if touches:
                db.executemany(_TOUCH_SESSION, _merge(touches))
            if ends:
                db.executemany(_CLOSE_SESSION, [(end.at, end.agent, end.session) for end in ends])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database, without waiting for (or blocking) the writer;
        the next write transaction then starts the log over, if nothing was committed meanwhile."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def end_sessions(self, at: float) -> None:
        """Handshake-era sessions do not outlive the gateway process that served them."""
        self.db.execute(
            "UPDATE sessions SET closed_at = ? WHERE closed_at IS NULL AND session NOT LIKE ?",
            (at, STATELESS_PREFIX + "%"),
        )

    # -- reading -------------------------------------------------------------------------------

    def query(self, where: AuditFilter) -> list[dict[str, Any]]:
        """The newest rows matching `where`, newest first.

        The first filter given of agent, tool, enclave, decision (most selective first) walks its (column, at)
        index; the others are written `+column` so that SQLite, which keeps no statistics here, cannot pick a
        low-selectivity index (decision has three values) and scan most of the table.
        """
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("agent", where.agent),
            ("target", where.tool),
            ("enclave", where.enclave),
            ("decision", where.decision),
        ):
            if value is not None:
                clauses.append(f"{'+' if clauses else ''}{column} = ?")
                params.append(value)
        if where.since is not None:
            clauses.append("at >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("at < ?")
            params.append(where.until)
        condition = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT id, {_COLUMN_LIST} FROM audit{condition} ORDER BY at DESC, id DESC LIMIT ?"
        return [dict(zip(("id", *COLUMNS), row, strict=True)) for row in self.db.execute(sql, (*params, where.limit))]

    def sessions(self, live_since: float | None) -> list[dict[str, Any]]:
        """Sessions, most recently active first; with `live_since`, only open ones active since then."""
        condition = " WHERE closed_at IS NULL AND last_seen >= ?" if live_since is not None else ""
        params = (live_since,) if live_since is not None else ()
        sql = f"SELECT {_SESSION_COLUMNS} FROM sessions{condition} ORDER BY last_seen DESC"
        return [dict(zip(_SESSION_COLUMNS.split(", "), row, strict=True)) for row in self.db.execute(sql, params)]

    def verify(self) -> Verdict:
        """Walk the chain in id order; name the first row that was edited, deleted or moved."""
        count, prev_id, prev_hash = 0, 0, GENESIS
        for row_id, stored_prev, stored_hash, *values in self.db.execute(
            f"SELECT id, prev_hash, row_hash, {_COLUMN_LIST} FROM audit ORDER BY id"
        ):
            if chain_hash(stored_prev, dict(zip(COLUMNS, values, strict=True))) != stored_hash:
                return Verdict(count, row_id, "edited: its content does not match its hash")
            if row_id != prev_id + 1:
                gap = f"row {prev_id + 1} is" if row_id == prev_id + 2 else f"rows {prev_id + 1}-{row_id - 1} are"
                return Verdict(count, row_id, f"{gap} missing before it (deleted)")
            if stored_prev != prev_hash:
                return Verdict(count, row_id, self._misplaced(stored_prev, prev_id))
            count, prev_id, prev_hash = count + 1, row_id, stored_hash
        head = self.db.execute("SELECT id, hash FROM audit_head").fetchone()
        last_id, last_hash = head if head is not None else (0, GENESIS)
        if last_id > prev_id:
            return Verdict(count, prev_id + 1, f"missing (deleted): the chain head says the log ends at row {last_id}")
        if (last_id, last_hash) != (prev_id, prev_hash):
            return Verdict(count, prev_id, "the last row does not match the recorded head of the chain")
        return Verdict(count)

    def _misplaced(self, expected_predecessor: str, prev_id: int) -> str:
        found = self.db.execute("SELECT id FROM audit WHERE row_hash = ?", (expected_predecessor,)).fetchone()
        if found is None:
            return "the row that preceded it is missing (deleted or rewritten)"
        return f"out of order: it follows row {found[0]}, not row {prev_id}"


def _merge(touches: Iterable[SessionTouch]) -> list[dict[str, Any]]:
    """One upsert per session for a whole batch of calls."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for touch in touches:
        entry = merged.get((touch.agent, touch.session))
        if entry is None:
            merged[(touch.agent, touch.session)] = {
                **vars(touch),  # not dataclasses.asdict: its deep copy was ~20 us per call
                "first_seen": touch.at,
                "last_seen": touch.at,
                "calls": 1,
            }
            continue
        entry["first_seen"] = min(entry["first_seen"], touch.at)
        entry["last_seen"] = max(entry["last_seen"], touch.at)
        entry["calls"] += 1
        entry["process"] = touch.process or entry["process"]
    return list(merged.values())
