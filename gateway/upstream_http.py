"""The HTTP transport to upstream servers: a plain JSON reply is bounded as a streamed one is.

The SDK bounds each event of a streamed (SSE) reply (`max_sse_event_size`, which the gateway sets to the
connector's `max_result_bytes`) but reads a plain JSON reply whole. This transport reads such a reply itself, at
most `max_bytes` of it: a longer one is dropped unread and the request gets the gateway's RESULT_TOO_LARGE error
in its place, so the gateway never holds more. It asks for uncompressed replies; one compressed all the same is
counted as it arrives (compressed) and checked again, decompressed, once received (`Gateway.count_out`).
"""

from __future__ import annotations

import json

import httpx2

from gateway import errors

IDENTITY = {"Accept-Encoding": "identity"}


class BoundedJsonTransport(httpx2.AsyncBaseTransport):
    """httpx transport for connector `connector`'s server, whose JSON replies may hold `max_bytes` at most."""

    def __init__(self, connector: str, max_bytes: int):
        self._inner = httpx2.AsyncHTTPTransport()
        self._connector = connector
        self._max_bytes = max_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if not response.headers.get("content-type", "").startswith("application/json"):
            return response
        body = bytearray()
        try:
            async for chunk in response.stream:  # type: ignore[union-attr]
                body += chunk
                if len(body) > self._max_bytes:
                    return self._too_large(request)
        finally:
            await response.aclose()
        return httpx2.Response(
            response.status_code, headers=response.headers, content=bytes(body), extensions=response.extensions
        )

    def _too_large(self, request: httpx2.Request) -> httpx2.Response:
        """The JSON-RPC error the request gets instead of the reply it was sent."""
        try:
            request_id = json.loads(request.content).get("id")
        except (ValueError, AttributeError):
            request_id = None
        error = errors.result_too_large(self._connector, self._max_bytes).error.model_dump(exclude_none=True)
        return httpx2.Response(200, json={"jsonrpc": "2.0", "id": request_id, "error": error})

    async def aclose(self) -> None:
        await self._inner.aclose()
