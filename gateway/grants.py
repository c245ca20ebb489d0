"""Chamber grants and call approvals, in the state database (their own tables).

A **grant** lets one agent call into one chamber of its enclave until it expires: optionally only one tool
(or resource) and only one exact set of arguments (their canonical digest), optionally a number of times.
An **approval** authorizes one single call (agent, target, argument digest): an operator decides it with
`enclave approve|deny`, the agent's user answers it through MCP elicitation, or the gateway issues one to
continue a call it already authorized across the 2026-era input-required rounds (a continuation).

Every use is consumed by one conditional UPDATE, so two concurrent calls can never both spend the last use.
Times are the gateway machine's clock (`time.time()`), the same for the CLI and the gateway.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import aiosqlite

from gateway import faults

SCHEMA = """
CREATE TABLE IF NOT EXISTS chamber_grants (
    id           TEXT PRIMARY KEY,
    agent        TEXT NOT NULL,
    enclave      TEXT NOT NULL,
    chamber      TEXT NOT NULL,
    target       TEXT,              -- tool name or resource URI; NULL = anything in the chamber
    args_digest  TEXT,              -- NULL = any arguments
    uses_left    INTEGER,           -- NULL = unlimited until expiry
    used         INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    revoked_at   REAL,
    reason       TEXT,
    created_by   TEXT
);
CREATE INDEX IF NOT EXISTS chamber_grants_by_chamber ON chamber_grants (enclave, chamber, created_at);
CREATE TABLE IF NOT EXISTS chamber_approvals (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,     -- operator | user | continuation
    agent        TEXT NOT NULL,
    enclave      TEXT NOT NULL,
    chamber      TEXT NOT NULL,
    target       TEXT NOT NULL,
    args_digest  TEXT NOT NULL,
    arguments    TEXT NOT NULL,     -- canonical JSON, so that whoever decides sees what they approve
    state_digest TEXT,              -- continuation: digest of the upstream request state it carries
    status       TEXT NOT NULL,     -- pending | approved | denied | used
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    decided_at   REAL,
    decided_by   TEXT,
    used_at      REAL
);
CREATE INDEX IF NOT EXISTS chamber_approvals_by_call ON chamber_approvals (agent, chamber, target, args_digest);
"""

ApprovalKind = Literal["operator", "user", "continuation"]
# Why a grant does not authorize a call, in the order checked: the later a grant fails, the more it says.
GRANT_REFUSALS = ("wrong_agent", "wrong_tool", "wrong_scope", "revoked", "expired", "used")


def canonical_arguments(arguments: dict[str, Any] | None) -> str:
    """Sorted keys, no whitespace, ASCII: the same arguments always give the same text."""
    return json.dumps(arguments or {}, sort_keys=True, separators=(",", ":"))


def argument_digest(arguments: dict[str, Any] | None) -> str:
    return hashlib.sha256(canonical_arguments(arguments).encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Grant:
    id: str
    agent: str
    enclave: str
    chamber: str
    target: str | None
    args_digest: str | None
    uses_left: int | None
    used: int
    created_at: float
    expires_at: float
    revoked_at: float | None
    reason: str | None
    created_by: str | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.uses_left is not None and self.uses_left <= 0:
            return "used"
        return "active"

    def refusal(self, agent: str, target: str, digest: str, now: float) -> str | None:
        """The first check this grant fails for the call (one of GRANT_REFUSALS), or None if it allows it."""
        if self.agent != agent:
            return "wrong_agent"
        if self.target is not None and self.target != target:
            return "wrong_tool"
        if self.args_digest is not None and self.args_digest != digest:
            return "wrong_scope"
        status = self.status(now)
        return None if status == "active" else status


@dataclass(frozen=True)
class Approval:
    id: str
    kind: ApprovalKind
    agent: str
    enclave: str
    chamber: str
    target: str
    args_digest: str
    arguments: str
    state_digest: str | None
    status: str
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    used_at: float | None

    def current_status(self, now: float) -> str:
        return "expired" if self.status in ("pending", "approved") and self.expires_at <= now else self.status


_GRANT_COLUMNS = ", ".join(Grant.__dataclass_fields__)
_APPROVAL_COLUMNS = ", ".join(Approval.__dataclass_fields__)


class GrantStore:
    """Queries on the grant and approval tables of one state-database connection."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db

    async def create_tables(self) -> None:
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    # -- grants --------------------------------------------------------------------------------

    async def add_grant(
        self,
        *,
        agent: str,
        enclave: str,
        chamber: str,
        target: str | None,
        args_digest: str | None,
        uses: int | None,
        created_at: float,
        expires_at: float,
        reason: str | None,
        created_by: str | None,
    ) -> str:
        grant_id = new_id("gr")
        await self._db.execute(
            "INSERT INTO chamber_grants (id, agent, enclave, chamber, target, args_digest, uses_left, created_at, "
            "expires_at, reason, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (grant_id, agent, enclave, chamber, target, args_digest, uses, created_at, expires_at, reason, created_by),
        )
        await self._db.commit()
        return grant_id

    async def grants(self, *, agent: str | None = None, chamber: str | None = None) -> list[Grant]:
        async with self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM chamber_grants WHERE (?1 IS NULL OR agent = ?1) "
            "AND (?2 IS NULL OR chamber = ?2) ORDER BY created_at",
            (agent, chamber),
        ) as cursor:
            return [Grant(*row) async for row in cursor]

    async def chamber_grants(self, enclave: str, chamber: str, limit: int = 500) -> list[Grant]:
        """The chamber's most recent grants, for every agent (a denial's reason looks at all of them)."""
        faults.check("grant_lookup", enclave)
        async with self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM chamber_grants WHERE enclave = ? AND chamber = ? "
            "ORDER BY created_at DESC LIMIT ?",
            (enclave, chamber, limit),
        ) as cursor:
            return [Grant(*row) async for row in cursor]

    async def use_grant(self, grant_id: str, now: float) -> bool:
        """Spend one use of an active grant; False if it is no longer active (another call spent it)."""
        async with self._db.execute(
            "UPDATE chamber_grants SET used = used + 1, uses_left = uses_left - 1 "
            "WHERE id = ? AND revoked_at IS NULL AND expires_at > ? AND (uses_left IS NULL OR uses_left > 0) "
            "RETURNING id",
            (grant_id, now),
        ) as cursor:
            row = await cursor.fetchone()
        await self._db.commit()
        return row is not None

    async def revoke_grant(self, grant_id: str, now: float) -> bool:
        cursor = await self._db.execute(
            "UPDATE chamber_grants SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, grant_id)
        )
        await self._db.commit()
        return cursor.rowcount > 0

    # -- approvals -----------------------------------------------------------------------------

    async def open_approval(
        self,
        *,
        kind: ApprovalKind,
        agent: str,
        enclave: str,
        chamber: str,
        target: str,
        arguments: dict[str, Any] | None,
        now: float,
        expires_at: float,
        state_digest: str | None = None,
        continues: str | None = None,
    ) -> Approval:
        """A new request. A continuation is issued already approved, by (`decided_by`) the grant or approval
        that authorized the call it continues."""
        approval = Approval(
            id=new_id("ap"),
            kind=kind,
            agent=agent,
            enclave=enclave,
            chamber=chamber,
            target=target,
            args_digest=argument_digest(arguments),
            arguments=canonical_arguments(arguments),
            state_digest=state_digest,
            status="approved" if kind == "continuation" else "pending",
            created_at=now,
            expires_at=expires_at,
            decided_at=now if kind == "continuation" else None,
            decided_by=continues,
            used_at=None,
        )
        placeholders = ", ".join("?" for _ in Approval.__dataclass_fields__)
        await self._db.execute(
            f"INSERT INTO chamber_approvals ({_APPROVAL_COLUMNS}) VALUES ({placeholders})",
            tuple(getattr(approval, name) for name in Approval.__dataclass_fields__),
        )
        await self._db.commit()
        return approval

    async def approval(self, approval_id: str) -> Approval | None:
        async with self._db.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM chamber_approvals WHERE id = ?", (approval_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return Approval(*row) if row is not None else None

    async def open_operator_approval(
        self, agent: str, enclave: str, chamber: str, target: str, digest: str, now: float
    ) -> Approval | None:
        """The still-open operator request for this exact call (an approved one first), if any."""
        async with self._db.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM chamber_approvals WHERE kind = 'operator' AND agent = ? AND "
            "enclave = ? AND chamber = ? AND target = ? AND args_digest = ? AND status IN ('pending', 'approved') "
            "AND expires_at > ? ORDER BY status = 'approved' DESC, created_at LIMIT 1",
            (agent, enclave, chamber, target, digest, now),
        ) as cursor:
            row = await cursor.fetchone()
        return Approval(*row) if row is not None else None

    async def approvals(self, *, kinds: tuple[ApprovalKind, ...] = ("operator", "user")) -> list[Approval]:
        marks = ", ".join("?" for _ in kinds)
        async with self._db.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM chamber_approvals WHERE kind IN ({marks}) ORDER BY created_at", kinds
        ) as cursor:
            return [Approval(*row) async for row in cursor]

    async def decide(self, approval_id: str, *, approve: bool, by: str, now: float) -> bool:
        """Approve or refuse a pending, unexpired request; False if it is not (or no longer) open."""
        cursor = await self._db.execute(
            "UPDATE chamber_approvals SET status = ?, decided_at = ?, decided_by = ? "
            "WHERE id = ? AND status = 'pending' AND expires_at > ?",
            ("approved" if approve else "denied", now, by, approval_id, now),
        )
        await self._db.commit()
        return cursor.rowcount > 0

    async def use_approval(self, approval_id: str, now: float, *, answered_by: str | None = None) -> bool:
        """Spend an approval on its one call. With `answered_by`, a pending request is approved and spent
        at once (the user answered it within the call)."""
        status = "pending" if answered_by else "approved"
        async with self._db.execute(
            "UPDATE chamber_approvals SET status = 'used', used_at = ?1, decided_at = coalesce(decided_at, ?1), "
            "decided_by = coalesce(decided_by, ?2) WHERE id = ?3 AND status = ?4 AND expires_at > ?1 RETURNING id",
            (now, answered_by, approval_id, status),
        ) as cursor:
            row = await cursor.fetchone()
        await self._db.commit()
        return row is not None
