"""The enclave view: the catalogue one enclave's agents see, and nothing else.

Exposure rules (names and globs per connector) are applied to the connectors' live lists; exposed tools
are renamed or prefixed and indexed by the name agents use, so that deciding a call is one dict lookup
whatever the number of tools. Anything outside the view is indistinguishable from a name that exists
nowhere.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import mcp_types as types

from gateway.config import Enclave, Exposure
from gateway.upstream import ListKind, UpstreamPool
from gateway.validation import ArgumentValidator

logger = logging.getLogger(__name__)

# A URI is matched only in canonical form: no dot segments (raw or percent-encoded), no control characters.
_DOT_SEGMENT = re.compile(r"(^|[/\\])\.{1,2}([/\\?#]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def canonical_uri(uri: str) -> str | None:
    decoded = unquote(uri)
    if _DOT_SEGMENT.search(decoded) or _CONTROL.search(decoded) or "\\" in decoded:
        return None
    return uri


@dataclass(frozen=True)
class ExposedTool:
    name: str
    connector: str
    upstream_name: str
    definition: types.Tool
    validator: ArgumentValidator


@dataclass(frozen=True)
class ExposedPrompt:
    name: str
    connector: str
    upstream_name: str
    definition: types.Prompt


class EnclaveView:
    """One enclave's catalogue, built from its connectors' lists and rebuilt when they change."""

    def __init__(self, enclave: Enclave, pool: UpstreamPool):
        self.enclave = enclave
        self._pool = pool
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

    async def _tool_entries(self, connector: str, exposure: Exposure) -> list[tuple[str, ExposedTool]]:
        entries = []
        for tool in await self._pool[connector].tools():
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
        """Merge every connector's exposed entries; a name claimed twice is withheld (never guessed)."""
        merged: dict[str, Any] = {}
        collided: set[str] = set()
        complete = True
        for connector, exposure in self.enclave.connectors.items():
            try:
                entries = await entries_of(connector, exposure)
            except Exception as exc:
                logger.warning(
                    "enclave %s: connector %s unavailable for listing: %s", self.enclave.name, connector, exc
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
        if canonical_uri(uri) is None:
            return None
        for connector, exposure in self.enclave.connectors.items():
            if exposure.resources.matches(uri):
                return connector
        return None

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
