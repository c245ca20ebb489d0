"""The example upstream servers work over stdio for clients of both protocol eras."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.context import ClientRequestContext
from mcp.types import CallToolResult, ElicitRequestParams, ElicitResult, TextContent

ROOT = Path(__file__).resolve().parents[1]
DESIGN_DB = ROOT / "examples" / "servers" / "design_db.py"
WEATHER_API = ROOT / "examples" / "servers" / "weather_api.py"
EVIL = ROOT / "tests" / "servers" / "evil.py"

pytestmark = pytest.mark.anyio
both_eras = pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def connect(script: Path, mode: str, env: dict[str, str] | None = None, **options: Any) -> Client:
    """A client for `script` run as a stdio subprocess, with `env` over the SDK's safe default environment."""
    return Client(StdioServerParameters(command=sys.executable, args=[str(script)], env=env), mode=mode, **options)


def text(result: CallToolResult) -> str:
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


@both_eras
async def test_design_db(mode: str) -> None:
    async def keep_it(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        assert params.message == "Really delete part P-100 (Hex bolt M8x40)?"
        return ElicitResult(action="accept", content={"confirm": False})

    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with connect(DESIGN_DB, mode, elicitation_callback=keep_it) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} == {
            "search_parts",
            "get_part",
            "export_design",
            "slow_count",
            "confirm_delete",
        }
        found = await client.call_tool("search_parts", {"query": "bearing"})
        assert found.structured_content == {
            "result": [{"id": "P-200", "name": "Ball bearing 6204", "material": "chrome steel"}]
        }
        counted = await client.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
        assert text(counted) == "counted 3"
        answered = await client.call_tool("confirm_delete", {"part_id": "P-100"})
        assert text(answered) == "P-100: kept"
    assert progress == [1, 2, 3]  # progress callbacks have all run once the client has shut down


@both_eras
async def test_weather_api_proves_the_key_without_returning_it(mode: str) -> None:
    key = "wk-live-0123456789abcdef"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    async with connect(WEATHER_API, mode, {"WEATHER_API_KEY": key}) as client:
        forecast = await client.call_tool("forecast", {"city": "Oslo"})
        whoami = await client.call_tool("whoami")
    assert forecast.structured_content is not None
    assert forecast.structured_content["key_fingerprint"] == fingerprint
    assert forecast.structured_content["city"] == "Oslo"
    assert whoami.structured_content == {"key_fingerprint": fingerprint}
    assert key not in forecast.model_dump_json() + whoami.model_dump_json()


async def test_weather_api_without_key() -> None:
    async with connect(WEATHER_API, "auto") as client:
        result = await client.call_tool("whoami")
    assert result.is_error
    assert "WEATHER_API_KEY is missing" in text(result)


@both_eras
async def test_evil_echo(mode: str) -> None:
    async with connect(EVIL, mode, {"EVIL_ECHO_VAR": "TOKEN", "TOKEN": "s3cret/+"}) as client:
        echoed = await client.call_tool("echo", {"text": "hello"})
        leaked = await client.call_tool("echo_secret_encodings")
    assert text(echoed) == "hello"
    assert text(leaked).splitlines() == [
        "raw: s3cret/+",
        "base64: czNjcmV0Lys=",
        "hex: 7333637265742f2b",
        "url: s3cret%2F%2B",
    ]


@both_eras
async def test_upstream_log_has_one_line_per_received_message(mode: str, tmp_path: Path) -> None:
    log = tmp_path / "upstream.jsonl"
    async with connect(DESIGN_DB, mode, {"UPSTREAM_LOG": str(log)}) as client:
        await client.list_tools()
        await client.call_tool("get_part", {"part_id": "P-101"})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    handshake = ["initialize", "notifications/initialized"] if mode == "legacy" else []
    assert [line["method"] for line in lines] == [*handshake, "tools/list", "tools/call"]
    assert lines[-1]["params"]["name"] == "get_part"
    assert lines[-1]["params"]["arguments"] == {"part_id": "P-101"}
