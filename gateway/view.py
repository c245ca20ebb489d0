"""The enclave view: the catalogue one enclave's agents see, and nothing else.

Exposure rules (names and globs per connector) are applied to the connectors' live lists; exposed tools
are renamed or prefixed and indexed by the name agents use, so that deciding a call is one dict lookup
whatever the number of tools. Anything outside the view is indistinguishable from a name that exists
nowhere. A tool whose upstream definition no longer matches its pin (gateway.pins) is left out as well.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import anyio
import mcp_types as types

from gateway import faults
from gateway.config import Enclave, Exposure
from gateway.pins import ToolPins
from gateway.upstream import ListKind, UpstreamPool
from gateway.validation import ArgumentValidator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExposedTool:
    name: str
    connector: str
    upstream_name: str
    definition: types.Tool
    validator: ArgumentValidator

    @cached_property
    def fast(self) -> bool:
        """Whether the fast path may serve it: it has no `x-mcp-header` arguments (Mcp-Param-* headers)."""
        return "x-mcp-header" not in json.dumps(self.definition.input_schema)


@dataclass(frozen=True)
class ExposedPrompt:
    name: str
    connector: str
    upstream_name: str
    definition: types.Prompt


class EnclaveView:
    """One enclave's catalogue, built from its connectors' lists and rebuilt when they change."""

    def __init__(self, enclave: Enclave, pool: UpstreamPool, pins: ToolPins):
        self.enclave = enclave
        self._pool = pool
        self._pins = pins
        self._tools: dict[str, ExposedTool] | None = None
        self._prompts: dict[str, ExposedPrompt] | None = None

    def uses(self, connector: str) -> bool:
        return connector in self.enclave.connectors

    def invalidate(self, kind: ListKind) -> None:
        if kind == "tools":
            self._tools = None
        elif kind == "prompts":
            self._prompts = None

    # -- tools ---------------------------------------------------------------------------------

    async def tools(self) -> dict[str, ExposedTool]:
        faults.check("policy", self.enclave.name)
        if self._tools is None:
            tools, complete = await self._build(self._tool_entries)
            if complete:
                self._tools = tools
            return tools
        return self._tools

    async def tool(self, name: str) -> ExposedTool | None:
        return (await self.tools()).get(name)

    def cached_tool(self, name: str) -> ExposedTool | None:
        return self._tools.get(name) if self._tools is not None else None

    def withheld(self, name: str) -> bool:
        """Whether the tool agents would know as `name` is hidden because its definition changed upstream."""
        return any(
            self._pins.withheld(connector, upstream)
            for connector, exposure in self.enclave.connectors.items()
            for upstream in exposure.upstream_tools(name)
        )

    async def _tool_entries(self, connector: str, exposure: Exposure) -> list[tuple[str, ExposedTool]]:
        entries = []
        for tool in await self._pins.approved(connector, await self._pool[connector].tools()):
            if exposure.tools.matches(tool.name):
                name = exposure.exposed_name(tool.name)
                definition = tool.model_copy(update={"name": name})
                entries.append(
                    (
                        name,
                        ExposedTool(name, connector, tool.name, definition, ArgumentValidator(name, tool.input_schema)),
                    )
                )
        return entries

    # -- prompts -------------------------------------------------------------------------------

    async def prompts(self) -> dict[str, ExposedPrompt]:
        faults.check("policy", self.enclave.name)
        if self._prompts is None:
            prompts, complete = await self._build(self._prompt_entries)
            if complete:
                self._prompts = prompts
            return prompts
        return self._prompts

    async def prompt(self, name: str) -> ExposedPrompt | None:
        return (await self.prompts()).get(name)

    async def _prompt_entries(self, connector: str, exposure: Exposure) -> list[tuple[str, ExposedPrompt]]:
        entries = []
        for prompt in await self._pool[connector].prompts():
            if exposure.prompts.matches(prompt.name):
                name = exposure.exposed_prompt_name(prompt.name)
                entries.append(
                    (name, ExposedPrompt(name, connector, prompt.name, prompt.model_copy(update={"name": name})))
                )
        return entries

    async def _build(self, entries_of: Any) -> tuple[dict[str, Any], bool]:
        """Merge every connector's exposed entries (fetched concurrently, merged in configuration order);
        a name claimed twice is withheld (never guessed)."""
        fetched: dict[str, Any] = {}

        async def fetch(connector: str, exposure: Exposure) -> None:
            try:
                fetched[connector] = await entries_of(connector, exposure)
            except Exception as exc:
                fetched[connector] = exc

        async with anyio.create_task_group() as tg:
            for connector, exposure in self.enclave.connectors.items():
                tg.start_soon(fetch, connector, exposure)
        merged: dict[str, Any] = {}
        collided: set[str] = set()
        complete = True
        for connector in self.enclave.connectors:
            entries = fetched[connector]
            if isinstance(entries, Exception):
                logger.warning(
                    "enclave %s: connector %s unavailable for listing: %s", self.enclave.name, connector, entries
                )
                complete = False
                continue
            for name, entry in entries:
                if name in merged:
                    collided.add(name)
                merged.setdefault(name, entry)
        for name in collided:
            logger.warning(
                "enclave %s: name %r is exposed by more than one connector; withheld", self.enclave.name, name
            )
            del merged[name]
        return merged, complete

    # -- resources -----------------------------------------------------------------------------

    def resource_connector(self, uri: str) -> str | None:
        """The connector that serves `uri` for this enclave, or None if the enclave does not expose it."""
        faults.check("policy", self.enclave.name)
        return self.enclave.resource_connector(uri)

    async def resources(self) -> list[types.Resource]:
        listed: list[types.Resource] = []
        for connector, exposure in self.enclave.connectors.items():
            if exposure.resources.items:
                for resource in await self._pool[connector].resources():
                    if self.resource_connector(resource.uri) == connector:
                        listed.append(resource)
        return listed

    async def resource_templates(self) -> list[types.ResourceTemplate]:
        listed: list[types.ResourceTemplate] = []
        for connector, exposure in self.enclave.connectors.items():
            if exposure.resources.items:
                for template in await self._pool[connector].resource_templates():
                    if self.resource_connector(template.uri_template) == connector:
                        listed.append(template)
        return listed
