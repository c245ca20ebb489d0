"""Per-agent rate and concurrency limits, kept in memory, O(1) per request.

Rate: a token bucket per agent (`agent_rate_per_second`, up to `agent_burst` saved up). Concurrency: a count
of the agent's requests in flight (`agent_concurrency`). State is one small entry per agent that has sent a
request, so its size is bounded by the agents the directory knows (unauthenticated requests never get one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.config import Limits


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float = -1.0  # full on first use
    stamp: float = field(default_factory=time.monotonic)

    def take(self, now: float | None = None) -> float:
        """Take one token: 0 if there was one, else the seconds until there will be (nothing is taken)."""
        now = time.monotonic() if now is None else now
        self.tokens = self.burst if self.tokens < 0 else min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class AgentLimiter:
    """The limits of every agent."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def admit(self, agent: str) -> float:
        """Count one request against the agent's rate: 0 if allowed, else seconds to wait before retrying."""
        bucket = self._buckets.get(agent)
        if bucket is None:
            bucket = self._buckets[agent] = TokenBucket(self.limits.agent_rate_per_second, self.limits.agent_burst)
        return bucket.take()

    def enter(self, agent: str) -> bool:
        """Start one request if the agent has fewer than its limit in flight (then `leave` must follow)."""
        count = self._in_flight.get(agent, 0)
        if count >= self.limits.agent_concurrency:
            return False
        self._in_flight[agent] = count + 1
        return True

    def leave(self, agent: str) -> None:
        count = self._in_flight[agent] - 1
        if count:
            self._in_flight[agent] = count
        else:
            del self._in_flight[agent]
