"""The state database (SQLite through aiosqlite, WAL, synchronous=FULL).

One small interface, `StateStore`, so that another backend (PostgreSQL for multi-replica deployments) can
be added without touching its callers. Tokens are never stored, only their hashes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from gateway.tokens import ensure_state_dir

DB_FILE = "state.db"
# Every connection to the state database: durable commits, and waits (rather than fails) for a busy writer.
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA busy_timeout=5000")

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name        TEXT PRIMARY KEY,
    enclave     TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    revoked_at  REAL
);
"""


class StateError(Exception):
    """A state operation that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class AgentRecord:
    name: str
    enclave: str
    token_hash: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class StateStore:
    """Agents (and, as the product grows, grants, sessions, pins and the audit log)."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db

    @property
    def db(self) -> aiosqlite.Connection:
        """The connection, for the stores of other concepts (each owns its tables)."""
        return self._db

    @classmethod
    @asynccontextmanager
    async def open(cls, state_dir: Path) -> AsyncIterator[StateStore]:
        path = ensure_state_dir(state_dir) / DB_FILE
        async with aiosqlite.connect(path) as db:
            for pragma in PRAGMAS:
                await db.execute(pragma)
            await db.executescript(SCHEMA)
            await db.commit()
            path.chmod(0o600)
            yield cls(db)

    async def add_agent(self, name: str, enclave: str, token_hash: str, expires_at: float | None) -> None:
        """Store a new agent; a revoked agent of the same name is replaced, an active one is kept."""
        async with self._db.execute("SELECT revoked_at FROM agents WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        if row is not None and row[0] is None:
            raise StateError(f"agent {name!r} already exists; revoke it first with: enclave agent revoke {name}")
        await self._db.execute(
            "INSERT OR REPLACE INTO agents (name, enclave, token_hash, created_at, expires_at, revoked_at) "
            "VALUES (?, ?, ?, ?, ?, NULL)",
            (name, enclave, token_hash, time.time(), expires_at),
        )
        await self._db.commit()

    async def revoke_agent(self, name: str) -> bool:
        cursor = await self._db.execute(
            "UPDATE agents SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name)
        )
        await self._db.commit()
        return cursor.rowcount > 0

    async def agents(self) -> list[AgentRecord]:
        async with self._db.execute(
            "SELECT name, enclave, token_hash, created_at, expires_at, revoked_at FROM agents ORDER BY name"
        ) as cursor:
            return [AgentRecord(*row) async for row in cursor]
