"""Bearer authentication: token -> agent -> enclave, decided in memory on every HTTP request.

Identity comes only from the token: no header, session id or claim a client sends can change who it is.
Every failure cause (missing, malformed, duplicated, unknown, expired, revoked, agent no longer in any
enclave, an internal error) gets the same 401 from the SDK's RequireAuthMiddleware; the cause is kept on the
ASGI scope for the audit record only.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials, AuthenticationBackend
from starlette.requests import HTTPConnection

from gateway import faults
from gateway.config import Config
from gateway.state import AgentRecord
from gateway.tokens import fingerprint, token_hash

logger = logging.getLogger(__name__)

AUTH_FAILURE_KEY = "enclave.auth_failure"


@dataclass(frozen=True)
class Agent:
    name: str
    enclave: str
    expires_at: float | None


@dataclass(frozen=True)
class AuthFailure:
    reason: str
    token_fingerprint: str | None


class AuthenticatedAgent(AuthenticatedUser):
    """The Starlette user for an authenticated agent; the SDK binds HTTP sessions to it."""

    def __init__(self, agent: Agent, token_fingerprint: str):
        super().__init__(
            AccessToken(
                token=token_fingerprint,  # never the token itself
                client_id=agent.name,
                subject=agent.name,
                scopes=[],
                expires_at=int(agent.expires_at) if agent.expires_at else None,
                claims={"enclave": agent.enclave},
            )
        )
        self.agent = agent


current_agent: ContextVar[Agent | None] = ContextVar("current_agent", default=None)
"""The agent of the HTTP request being served, for SDK hooks that get no request context."""


class AgentDirectory:
    """Token hashes -> agents, in memory; replaced wholesale when the state or the configuration changes."""

    def __init__(self, key: bytes):
        self._key = key
        self._by_hash: dict[str, AgentRecord] = {}
        self._config: Config | None = None

    def replace(self, records: Iterable[AgentRecord], config: Config) -> None:
        self._by_hash = {record.token_hash: record for record in records}
        self._config = config

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: the same tokens, checked against the enclaves it defines from now on."""
        self._config = config

    def authenticate(self, token: str) -> Agent | AuthFailure:
        digest = token_hash(token)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            return self.failure("unknown_token", token)
        faults.check("auth", record.name)
        status = record.status(time.time())
        if status != "active":
            return self.failure(status, token)
        enclave = self._config.enclave_of(record.name) if self._config else None
        if enclave is None or enclave.name != record.enclave:
            return self.failure("agent_not_in_enclave", token)
        return Agent(record.name, record.enclave, record.expires_at)

    def fingerprint(self, token: str) -> str:
        return fingerprint(self._key, token)

    def failure(self, reason: str, token: str | None = None) -> AuthFailure:
        return AuthFailure(reason, self.fingerprint(token) if token is not None else None)


class BearerBackend(AuthenticationBackend):
    """Starlette authentication backend; returns None (-> the one 401) for every failure cause."""

    def __init__(self, directory: AgentDirectory):
        self.directory = directory

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, AuthenticatedAgent] | None:
        result = self._check(conn)
        if isinstance(result, AuthFailure):
            conn.scope[AUTH_FAILURE_KEY] = result
            return None
        agent, token_fingerprint = result
        current_agent.set(agent)
        return AuthCredentials([]), AuthenticatedAgent(agent, token_fingerprint)

    def agent_for(self, conn: HTTPConnection) -> Agent | None:
        """The authenticated agent, or None; the fast path's check (failures go the full way, to be audited)."""
        result = self._check(conn)
        return None if isinstance(result, AuthFailure) else result[0]

    def _check(self, conn: HTTPConnection) -> tuple[Agent, str] | AuthFailure:
        values = conn.headers.getlist("authorization")
        if not values:
            return self.directory.failure("missing_token")
        if len(values) > 1:
            return self.directory.failure("duplicate_authorization_header")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token or token != token.strip() or " " in token:
            return self.directory.failure("malformed_authorization_header")
        try:
            outcome = self.directory.authenticate(token)
        except Exception:  # fail closed: whatever breaks in here is one more cause of the one 401
            logger.exception("authentication failed with an internal error; the request is refused")
            return self.directory.failure("internal_error", token)
        if isinstance(outcome, AuthFailure):
            return outcome
        return outcome, self.directory.fingerprint(token)
