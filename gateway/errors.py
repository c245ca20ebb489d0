"""The JSON-RPC errors the gateway itself answers with, and their messages.

Codes in the server range (-32000..-32099) are the gateway's own; each message says what to do next.
Replies that must not reveal whether something exists (unknown tool, prompt or resource) are built here
and nowhere else, so a hidden name and a name that exists nowhere get byte-identical answers.
"""

from __future__ import annotations

from mcp import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST

from gateway.invocation import Denied

UPSTREAM_UNAVAILABLE = -32001
RESOURCE_NOT_FOUND = -32002  # the code MCP servers use for an unknown resource
AUTHORIZATION_REQUIRED = -32003  # a chamber call without a valid grant or approval (gateway.chambers)
UPSTREAM_TIMEOUT = -32004
TOO_MANY_REQUESTS = -32005  # an agent over its rate or concurrency limit (gateway.guard); HTTP 429, Retry-After
RESULT_TOO_LARGE = -32006  # an upstream message over max_result_bytes


def unknown_tool(name: str, reason: str = "not_in_enclave") -> Denied:
    """Also the reply for a tool hidden for another `reason` (audited only), e.g. `definition_changed`."""
    return Denied(INVALID_PARAMS, f"Unknown tool: {name}", reason)


def unknown_prompt(name: str) -> Denied:
    return Denied(INVALID_PARAMS, f"Unknown prompt: {name}", "not_in_enclave")


def unknown_resource(uri: str) -> Denied:
    return Denied(RESOURCE_NOT_FOUND, f"Resource not found: {uri}", "not_in_enclave")


def upstream_unavailable(connector: str) -> str:
    return f"Upstream server '{connector}' is unavailable; the gateway will restart it on the next call"


def upstream_backing_off(connector: str, failures: int, seconds: float) -> str:
    return (
        f"Upstream server '{connector}' is unavailable: it failed {failures} times in a row; "
        f"the gateway restarts it in {seconds:.1f} s"
    )


def result_too_large(connector: str | None, limit: int) -> MCPError:
    """`connector` None: a list merged from several upstream servers."""
    source = f"Upstream server '{connector}' sent a message" if connector else "The upstream servers' lists came to"
    return MCPError(RESULT_TOO_LARGE, f"{source} larger than {limit} bytes (max_result_bytes); the gateway dropped it")


def upstream_timeout(connector: str) -> str:
    return f"Upstream server '{connector}' did not answer in time; the request was cancelled"


def too_many_input_rounds(limit: int) -> MCPError:
    return MCPError(INVALID_REQUEST, f"Upstream asked for input more than {limit} times; gave up")


def invalid_arguments(tool: str, field: str, problem: str) -> Denied:
    where = f"argument '{field}'" if field else "arguments"
    return Denied(INVALID_PARAMS, f"Invalid {where} for tool {tool}: {problem}", "invalid_arguments")


def internal(correlation_id: str) -> MCPError:
    return MCPError(INTERNAL_ERROR, f"Internal gateway error (correlation id {correlation_id}); the call was denied")
