"""Fault injection, for the tests that prove the gateway fails closed (tests/security/test_fail_closed.py).

`ENCLAVE_FAULT_INJECT=POINT[@NAME],...` makes `check(POINT, NAME)` raise `InjectedFault` in the real process,
at the real place where the gateway decides: `auth` (authenticating a token, NAME = the agent), `policy` (the
enclave view, NAME = the enclave), `grant_lookup` (a chamber's grants, NAME = the enclave) and `audit_write`
(recording a request, NAME = the agent). Without `@NAME` the point fails for everyone. The variable is read
once, at import; unset (always, in production) every check is one test of an empty dict.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

POINTS = frozenset({"auth", "policy", "grant_lookup", "audit_write"})
EVERYONE = "*"


class InjectedFault(RuntimeError):
    """A fault asked for by ENCLAVE_FAULT_INJECT."""


def _parse(spec: str) -> dict[str, frozenset[str]]:
    points: dict[str, set[str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, name = item.partition("@")
        if point not in POINTS:
            raise ValueError(f"ENCLAVE_FAULT_INJECT: unknown point {point!r}; use one of {', '.join(sorted(POINTS))}")
        points.setdefault(point, set()).add(name or EVERYONE)
    return {point: frozenset(names) for point, names in points.items()}


_active = _parse(os.environ.get("ENCLAVE_FAULT_INJECT", ""))
if _active:
    logger.warning("fault injection is on (ENCLAVE_FAULT_INJECT): %s", ", ".join(sorted(_active)))


def check(point: str, name: str | None = None) -> None:
    """Raise `InjectedFault` if `point` is to fail for `name`."""
    if _active and (names := _active.get(point)) and (EVERYONE in names or name in names):
        raise InjectedFault(f"injected fault at {point}")
