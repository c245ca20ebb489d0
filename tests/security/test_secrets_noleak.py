"""Secrets: every way out of the gateway is redacted, whatever an upstream does with its credential
(threat-principles: OWASP MCP01; the Docker gateway's secret blocking; the MCP checklist's "redact secrets in logs
and errors").

The `leaky` connectors (a handshake-era and a 2026-07-28 evil, EVIL_LEAK) put their credential in a progress
message, a log message, an elicitation, a tool description, a text and a binary resource and a prompt; `evil`
echoes it raw, base64, hex and URL-encoded in results and errors. Each case then sweeps everything (NOLEAK, the
spans exported over OTLP included).

Proven elsewhere, not repeated: an HTTP upstream echoing the request headers it received (its injected
Authorization header comes back redacted: tests/test_upstreams.py::test_http_upstream_with_an_injected_header_
credential); audit rows (tests/test_audit.py::test_no_credential_or_token_in_any_audit_row); spans and metrics
(tests/test_telemetry.py::test_no_secret_token_or_argument_is_ever_exported); the two request paths alike
(tests/test_fastpath.py::test_secrets_never_leave_either_path).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import MCPError
from mcp.client.context import ClientRequestContext

from tests.harness import ERAS, connect, modern_post
from tests.security.conftest import audit
from tests.security.invariants import Deployment, assert_invariants, leaks

pytestmark = pytest.mark.anyio

REDACTED = "[REDACTED]"


def exports(world: Deployment) -> int:
    assert world.receiver is not None
    return len(world.receiver.exports)


async def exported_since(world: Deployment, before: int) -> None:
    """Wait until the gateway has exported spans again, so that the sweep sees this case's spans too."""
    deadline = time.monotonic() + 10
    while exports(world) <= before:
        assert time.monotonic() < deadline, "no spans exported"
        await anyio.sleep(0.02)


@pytest.mark.parametrize("mode", ERAS)
async def test_results_and_errors_echoing_the_credential(world: Deployment, mode: str) -> None:
    """Raw, base64, hex, URL-encoded, in a result, in a JSON-RPC error's message and data, in the environment;
    and an agent token echoed back (anything shaped like one is scrubbed). Each call that had something cut out
    is audited so (reason `credential_redacted`): the upstream echoed its credential."""
    mark, since = exports(world), max((row["id"] for row in audit(world)), default=0)
    captured: list[Any] = []
    async with connect(world.url, world.tokens["a1"], mode) as client:
        await client.list_tools()  # listed: in the 2026 era the calls below take the fast path
        for name, arguments in [
            ("echo_env", {}),
            ("echo_secret_encodings", {}),
            ("echo", {"text": f"my token is {world.tokens['a1']}"}),
        ]:
            result = await client.call_tool(name, arguments)
            assert REDACTED in result.model_dump_json()
            captured.append(result)
    error_params = {"name": "echo_secret_encodings", "arguments": {"as_error": True}}
    reply = modern_post(world.url, "tools/call", error_params, world.tokens["a1"])
    assert '"error"' in reply.text and REDACTED in reply.text
    calls = audit(world, "id > ? AND agent = 'a1' AND method = 'tools/call' AND error_code IS NULL", (since,))
    assert [(row["target"], row["decision"], row["outcome"], row["reason"]) for row in calls] == [
        (name, "allow", "ok", "credential_redacted") for name in ("echo_env", "echo_secret_encodings", "echo")
    ]
    await exported_since(world, mark)
    assert_invariants(world, *captured, reply)


@pytest.mark.filterwarnings("ignore:The logging capability is deprecated")  # handshake-era agents still use it
@pytest.mark.parametrize("mode", ERAS)
async def test_progress_logs_and_questions_quoting_the_credential(world: Deployment, mode: str) -> None:
    """Notifications and requests relayed to the agent: progress messages, log messages (handshake era, which
    has logging) and elicitations, from an upstream of either era."""
    mark = exports(world)
    progress: list[str | None] = []
    logged: list[Any] = []
    asked: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.append(params.data)

    async def on_question(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    captured: list[Any] = []
    async with connect(
        world.url, world.tokens["a1"], mode, logging_callback=on_log, elicitation_callback=on_question
    ) as client:
        if mode == "legacy":
            await client.session.set_logging_level("debug")
        for prefix in ("old_", "new_"):
            captured.append(await client.call_tool(f"{prefix}leak_progress", {}, progress_callback=on_progress))
            try:
                captured.append(await client.call_tool(f"{prefix}leak_elicit", {}))
            except MCPError as refused:  # a handshake-era upstream cannot ask a 2026-era agent (test_conformance)
                assert (mode, prefix) == ("2026-07-28", "old_")
                captured.append(refused)
    assert progress and all(message is not None and REDACTED in message for message in progress), progress
    assert len(asked) == (2 if mode == "legacy" else 1) and all(REDACTED in message for message in asked), asked
    if mode == "legacy":
        assert logged and all(REDACTED in str(data) for data in logged), logged
    await exported_since(world, mark)
    assert_invariants(world, *captured, *progress, *logged, *asked)


@pytest.mark.parametrize("mode", ERAS)
async def test_lists_resources_and_prompts_quoting_the_credential(world: Deployment, mode: str) -> None:
    """A tool description (a poisoned list), a text resource, a binary resource (the credential inside the
    base64 blob stays out, and the blob still decodes) and prompts."""
    mark = exports(world)
    async with connect(world.url, world.tokens["a1"], mode) as client:
        tools = await client.list_tools()
        described = [tool for tool in tools.tools if tool.name.endswith("leak_described")]
        text = await client.read_resource("evil://leak")
        blob = await client.read_resource("evil://leak.bin")
        prompts = [await client.get_prompt(f"{prefix}leak_prompt") for prefix in ("old_", "new_")]
    assert len(described) == 2 and all(REDACTED in (tool.description or "") for tool in described)
    assert REDACTED in text.model_dump_json()
    (contents,) = blob.contents
    assert isinstance(contents, types.BlobResourceContents)
    decoded = base64.b64decode(contents.blob)
    assert REDACTED.encode() in decoded and not leaks(decoded.decode("latin-1"), world.canaries)
    assert all(REDACTED in prompt.model_dump_json() for prompt in prompts)
    await exported_since(world, mark)
    assert_invariants(world, tools, text, blob, *prompts)
