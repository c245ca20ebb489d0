"""weather-api: a stand-in for a SaaS API that needs `WEATHER_API_KEY`, served as an MCP upstream.

Results carry `key_fingerprint` (the first 12 hex digits of the key's SHA-256) so a caller can check which
key the upstream received; the key itself is never returned.

Run `python weather_api.py` for stdio or `python weather_api.py --http PORT` for Streamable HTTP.
"""

from __future__ import annotations

import hashlib
import os
import zlib

from _common import main
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

API_KEY = os.environ.get("WEATHER_API_KEY")
CONDITIONS = ["sunny", "cloudy", "rain", "snow", "fog", "windy"]


class Identity(BaseModel):
    key_fingerprint: str


class Forecast(BaseModel):
    key_fingerprint: str
    city: str
    condition: str
    temperature_c: int


server = MCPServer("weather-api", instructions="Weather forecasts from an API that needs a key.")


def key_fingerprint() -> str:
    """The first 12 hex digits of `sha256(WEATHER_API_KEY)`, or a tool error if the key is missing."""
    if not API_KEY:
        raise ToolError("WEATHER_API_KEY is missing: the weather API cannot be called")
    return hashlib.sha256(API_KEY.encode()).hexdigest()[:12]


@server.tool()
def forecast(city: str) -> Forecast:
    """Tomorrow's (fake, deterministic) forecast for a city."""
    seed = zlib.crc32(city.lower().encode())
    return Forecast(
        key_fingerprint=key_fingerprint(),
        city=city,
        condition=CONDITIONS[seed % len(CONDITIONS)],
        temperature_c=seed % 35 - 5,
    )


@server.tool()
def whoami() -> Identity:
    """Identify the API key this server calls the weather API with."""
    return Identity(key_fingerprint=key_fingerprint())


if __name__ == "__main__":
    main(server)
