"""Strict decoding of an agent's request body: the one JSON reading every request path relies on.

The gateway decides from what it decodes, and the SDK behind it decodes the body again (the handshake era
with pydantic-core, the 2026-07-28 era with the standard library). Where two JSON readers may disagree they
could act on different messages (a parser differential), so whatever they could read differently is refused
here, before either reads it: duplicate keys (each reader keeps the last, an intermediary may keep the first),
NaN, Infinity and numbers too large for a float, unpaired UTF-16 surrogates, bytes that are not UTF-8 (the
standard library also accepts UTF-16 and UTF-32), and nesting deeper than the limit (the readers' recursion
limits differ). A batch (a JSON array) is refused: MCP removed JSON-RPC batching in 2025-06-18.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

from mcp_types import INVALID_REQUEST, PARSE_ERROR

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class MalformedRequest(Exception):
    """A body the gateway refuses to interpret; `code` is the JSON-RPC error code of the reply."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        duplicate = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise MalformedRequest(PARSE_ERROR, f"Parse error: duplicate key {duplicate!r} in a JSON object")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedRequest(PARSE_ERROR, f"Parse error: number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise MalformedRequest(PARSE_ERROR, f"Parse error: {name} is not JSON")


def depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (a scalar: 0)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def decode_message(body: bytes, max_depth: int) -> dict[str, Any]:
    """The one JSON-RPC message in `body`, or MalformedRequest saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_float=_finite, parse_constant=_no_constant)
    except MalformedRequest:
        raise
    except UnicodeDecodeError:
        raise MalformedRequest(PARSE_ERROR, "Parse error: the body is not UTF-8") from None
    except RecursionError:
        raise MalformedRequest(PARSE_ERROR, f"Parse error: nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise MalformedRequest(PARSE_ERROR, f"Parse error: {exc}") from None
    # Only a body with more brackets than the limit can be nested deeper than it: most never need the walk.
    if body.count(b"{") + body.count(b"[") > max_depth and depth(value) > max_depth:
        raise MalformedRequest(PARSE_ERROR, f"Parse error: nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedRequest(PARSE_ERROR, "Parse error: a string holds an unpaired UTF-16 surrogate") from None
    if isinstance(value, list):
        raise MalformedRequest(
            INVALID_REQUEST, "JSON-RPC batches are not supported: send one message per request (MCP 2025-06-18 on)"
        )
    if not isinstance(value, dict):
        raise MalformedRequest(INVALID_REQUEST, "Invalid request: the body must be one JSON-RPC message (an object)")
    return value
