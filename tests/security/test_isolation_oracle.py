"""Isolation without an existence oracle: a name outside the agent's enclave is answered exactly like a name
that exists nowhere, in the same time, and audited alike (threat-principles EUNK; 1.1: Obot's IDOR, Kuadrant's
and ContextForge's fail-open unknown scopes).

Proven elsewhere, not repeated: byte-identical replies (modulo the id and the name) for tools, prompts,
resources, completions and subscriptions hidden from each agent, traversals included, in both eras, with no
upstream contact (tests/test_isolation.py::test_hidden_and_nonexistent_replies_are_identical). This file adds
what an attacker could still measure: the time, and what the audit log makes of it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx2
import pytest

from tests.harness import ERAS, legacy_session, modern_post, raw_post
from tests.security.conftest import audit
from tests.security.invariants import Deployment, assert_invariants

SAMPLES = 25
# (agent, method, hidden name): each is compared with a name that exists nowhere.
PROBES = [
    ("b1", "tools/call", "search_parts"),  # another enclave's tool
    ("b1", "tools/call", "echo_env"),
    ("b1", "tools/call", "forecast"),  # its own connector's tool, under the name its enclave does not use
    ("a1", "tools/call", "wx_forecast"),
    ("b1", "resources/read", "design://catalogue"),
    ("b1", "prompts/get", "review_part"),
]
NOWHERE = {"tools/call": "nothing_by_this_name", "resources/read": "nowhere://x", "prompts/get": "nothing_by_this_name"}


def params(method: str, name: str) -> dict[str, Any]:
    if method == "resources/read":
        return {"uri": name}
    return {"name": name, "arguments": {"query": "bolt", "part_id": "P-100"} if method == "tools/call" else {}}


class Prober:
    """Sends probes as one agent, in one era (a handshake-era session, or 2026-era requests)."""

    def __init__(self, world: Deployment, agent: str, mode: str):
        self.world, self.token, self.mode = world, world.tokens[agent], mode
        self.session = legacy_session(world.url, self.token) if mode == "legacy" else {}
        self.next_id = 1

    def send(self, method: str, name: str) -> tuple[httpx2.Response, float]:
        self.next_id += 1
        started = time.perf_counter()
        if self.mode == "legacy":
            body = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params(method, name)}
            reply = raw_post(self.world.url, body, self.token, **self.session)
        else:
            reply = modern_post(self.world.url, method, params(method, name), self.token, self.next_id)
        return reply, time.perf_counter() - started


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(("agent", "method", "hidden"), PROBES)
def test_hidden_and_nonexistent_take_the_same_time_and_audit_alike(
    world: Deployment, mode: str, agent: str, method: str, hidden: str
) -> None:
    prober = Prober(world, agent, mode)
    nowhere = NOWHERE[method]
    for name in (hidden, nowhere):  # warm: the enclave view is listed once, whichever comes first
        prober.send(method, name)
    before = {name: log.count() for name, log in world.logs.items()}
    mark = max([row["id"] for row in audit(world)], default=0)
    times: dict[str, list[float]] = {hidden: [], nowhere: []}
    replies = []
    for _ in range(SAMPLES):
        for name in (hidden, nowhere):  # interleaved, so that machine noise hits both alike
            reply, elapsed = prober.send(method, name)
            times[name].append(elapsed)
            replies.append(reply)
    assert {name: log.count() for name, log in world.logs.items()} == before

    hidden_median, nowhere_median = statistics.median(times[hidden]), statistics.median(times[nowhere])
    assert abs(hidden_median - nowhere_median) < max(0.005, 0.5 * nowhere_median), (hidden_median, nowhere_median)

    rows = audit(world, "id > ? AND agent = ?", (mark, agent))
    shapes = {
        name: {(r["decision"], r["reason"], r["connector"], r["error_code"]) for r in rows if r["target"] == name}
        for name in (hidden, nowhere)
    }
    assert shapes[hidden] == shapes[nowhere] and len(shapes[hidden]) == 1
    assert next(iter(shapes[hidden]))[:3] == ("deny", "not_in_enclave", None)
    assert_invariants(world, *replies)
