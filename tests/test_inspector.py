"""The MCP Inspector CLI (a client nobody here wrote) against `enclave serve` over streamable HTTP.

It runs in each protocol era it offers: `legacy` (its default: the 2025-11-25 handshake), `modern`
(2026-07-28) and `auto` (which settles on modern against the gateway). The inspector checks a tool
name against tools/list before it calls, so a hidden tool fails in the client exactly like a missing one
because the gateway's list never shows it; the gateway's own reply to such a call is compared byte for
byte in tests/test_isolation.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import nodetools
from tests.conftest import E1_DESIGN_TOOLS, Topology

pytestmark = pytest.mark.node

INSPECTOR_ERAS = ("legacy", "modern", "auto")
E1_TOOLS = {*E1_DESIGN_TOOLS, "echo", "echo_env", "echo_secret_encodings"}
E2_TOOLS = {"wx_forecast", "wx_whoami", "get_current_time"}
SERVER_INFO = "io.modelcontextprotocol/serverInfo"


@pytest.fixture(autouse=True)
def inspector_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inspector keeps a catalogue and OAuth state under $HOME: give it an empty one of its own."""
    nodetools.require_tools()
    monkeypatch.setenv("HOME", str(tmp_path))


def inspect(topology: Topology, token: str | None, era: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run the inspector against the gateway: (exit code, {"result": ...} or {"error": ...})."""
    auth = ["--header", f"Authorization: Bearer {token}"] if token else []
    # The target goes before --header (which takes several values); never start an interactive OAuth login.
    return nodetools.inspector_json([topology.url, *auth, "--protocol-era", era, "--stored-auth-only", *args])


@pytest.mark.parametrize("era", INSPECTOR_ERAS)
def test_tools_list_shows_exactly_the_enclave(topology: Topology, era: str) -> None:
    for agent, expected in (("a1", E1_TOOLS), ("b1", E2_TOOLS)):
        code, out = inspect(topology, topology.tokens[agent], era, "--method", "tools/list")
        assert code == 0, out
        assert {tool["name"] for tool in out["result"]["tools"]} == expected


@pytest.mark.parametrize("era", INSPECTOR_ERAS)
def test_tools_call_of_an_exposed_tool(topology: Topology, era: str) -> None:
    before = topology.logs["design"].count()
    code, out = inspect(
        topology,
        topology.tokens["a1"],
        era,
        "--method",
        "tools/call",
        "--tool-name",
        "search_parts",
        "--tool-arg",
        "query=bolt",
    )
    assert code == 0, out
    result = out["result"]
    assert result["isError"] is False
    assert "Hex bolt" in result["content"][0]["text"]
    assert topology.logs["design"].calls()[-1]["params"]["name"] == "search_parts"
    assert topology.logs["design"].count() > before
    # The era really differs: only the 2026-07-28 era stamps the server's identity, and it is the gateway's.
    identity = result.get("_meta", {}).get(SERVER_INFO)
    if era == "legacy":
        assert identity is None
    else:
        assert identity["name"] == "enclave-gateway"


@pytest.mark.parametrize("era", INSPECTOR_ERAS)
def test_hidden_tool_fails_like_a_missing_one(topology: Topology, era: str) -> None:
    before = topology.logs["design"].count()
    args = ("--method", "tools/call", "--tool-arg", "query=bolt", "--tool-name")
    hidden = inspect(topology, topology.tokens["b1"], era, *args, "search_parts")  # e1's tool
    missing = inspect(topology, topology.tokens["b1"], era, *args, "no_such_tool_anywhere")
    assert hidden[0] == missing[0] == 5  # the inspector's tool_error exit code
    assert hidden[1]["error"]["code"] == missing[1]["error"]["code"] == "tool_not_found"
    mask = {"search_parts": "X", "no_such_tool_anywhere": "X"}
    assert _masked(hidden[1], mask) == _masked(missing[1], mask)
    assert topology.logs["design"].count() == before


@pytest.mark.parametrize("era", ("legacy", "modern"))  # the 401 comes before any era is negotiated
def test_no_or_bad_token_is_auth_required(topology: Topology, era: str) -> None:
    before = {name: log.count() for name, log in topology.logs.items()}
    replies = [inspect(topology, token, era, "--method", "tools/list") for token in (None, "encl_not_a_real_token")]
    for code, out in replies:
        assert code == 3, out  # the inspector's auth_required exit code
        assert out["error"]["code"] == "auth_required"
    assert replies[0] == replies[1]  # one identical 401 whatever the cause
    assert {name: log.count() for name, log in topology.logs.items()} == before


def _masked(reply: dict[str, Any], mask: dict[str, str]) -> str:
    text = str(reply)
    for name, stand_in in mask.items():
        text = text.replace(name, stand_in)
    return text
