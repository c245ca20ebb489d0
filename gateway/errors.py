"""The JSON-RPC errors the gateway itself answers with, and their messages.

Codes in the server range (-32000..-32099) are the gateway's own; each message says what to do next.
Replies that must not reveal whether something exists (unknown tool, prompt or resource) are built here
and nowhere else, so a hidden name and a name that exists nowhere get byte-identical answers.
"""

from __future__ import annotations

from mcp import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS

from gateway.invocation import Denied

UPSTREAM_UNAVAILABLE = -32001
RESOURCE_NOT_FOUND = -32002  # the code MCP servers use for an unknown resource
UPSTREAM_TIMEOUT = -32004


def unknown_tool(name: str) -> Denied:
    return Denied(INVALID_PARAMS, f"Unknown tool: {name}", "not_in_enclave")


def unknown_prompt(name: str) -> Denied:
    return Denied(INVALID_PARAMS, f"Unknown prompt: {name}", "not_in_enclave")


def unknown_resource(uri: str) -> Denied:
    return Denied(RESOURCE_NOT_FOUND, f"Resource not found: {uri}", "not_in_enclave")


def upstream_unavailable(connector: str) -> str:
    return f"Upstream server '{connector}' is unavailable; the gateway will restart it on the next call"


def upstream_timeout(connector: str) -> str:
    return f"Upstream server '{connector}' did not answer in time; the request was cancelled"


def invalid_arguments(tool: str, field: str, problem: str) -> Denied:
    where = f"argument '{field}'" if field else "arguments"
    return Denied(INVALID_PARAMS, f"Invalid {where} for tool {tool}: {problem}", "invalid_arguments")


def internal(correlation_id: str) -> MCPError:
    return MCPError(INTERNAL_ERROR, f"Internal gateway error (correlation id {correlation_id}); the call was denied")
