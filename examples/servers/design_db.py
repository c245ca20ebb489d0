"""design-db: a stand-in for a project's design database, served as an MCP upstream.

Run `python design_db.py` for stdio or `python design_db.py --http PORT` for Streamable HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Annotated, Literal

import anyio
from _common import main
from mcp import MCPError
from mcp.server import MCPServer
from mcp.server.mcpserver import AcceptedElicitation, Context, Elicit, ElicitationResult, Resolve
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import (
    INVALID_PARAMS,
    Completion,
    CompletionArgument,
    CompletionContext,
    PromptReference,
    ResourceTemplateReference,
)
from pydantic import BaseModel


class Part(BaseModel):
    id: str
    name: str
    material: str


class Confirmation(BaseModel):
    confirm: bool


CATALOGUE = [
    Part(id="P-100", name="Hex bolt M8x40", material="stainless steel"),
    Part(id="P-101", name="Hex nut M8", material="stainless steel"),
    Part(id="P-102", name="Flat washer M8", material="zinc-plated steel"),
    Part(id="P-200", name="Ball bearing 6204", material="chrome steel"),
    Part(id="P-201", name="Drive shaft 20 mm", material="hardened steel"),
    Part(id="P-300", name="Mounting bracket", material="aluminium 6061"),
    Part(id="P-301", name="Gearbox housing", material="cast iron"),
    Part(id="P-400", name="O-ring 30x2", material="nitrile rubber"),
]
PARTS = {part.id: part for part in CATALOGUE}

server = MCPServer("design-db", instructions="Search and export parts of the project's mechanical design.")


def find_part(part_id: str, error: Callable[[str], Exception] = ToolError) -> Part:
    """Look a part up, raising `error("Unknown part: ...")` if there is none."""
    if (part := PARTS.get(part_id)) is None:
        raise error(f"Unknown part: {part_id}")
    return part


@server.tool()
def search_parts(query: str, limit: int = 10) -> list[Part]:
    """Search the catalogue by name, material or id (case-insensitive substring match)."""
    needle = query.lower()
    hits = [part for part in CATALOGUE if any(needle in field.lower() for field in (part.id, part.name, part.material))]
    return hits[:limit]


@server.tool()
def get_part(part_id: str) -> Part:
    """Return one part by id."""
    return find_part(part_id)


@server.tool()
def export_design(part_id: str, format: Literal["step", "stl"]) -> str:
    """Export the full CAD model of a part (confidential)."""
    part = find_part(part_id)
    return f"{format.upper()} EXPORT {part.id} {part.name!r}\nBEGIN-CONFIDENTIAL-GEOMETRY\n{part.id * 8}\nEND\n"


@server.tool()
async def slow_count(n: int, ctx: Context) -> str:
    """Count to n slowly, reporting progress at every step."""
    for step in range(1, n + 1):
        await anyio.sleep(0.05)
        await ctx.report_progress(step, n, f"step {step}/{n}")
    return f"counted {n}"


def ask_to_delete(part_id: str) -> Elicit[Confirmation]:
    """Resolver for `confirm_delete`: ask the user, but only about a part that exists."""
    part = find_part(part_id)
    return Elicit(f"Really delete part {part.id} ({part.name})?", Confirmation)


@server.tool()
def confirm_delete(part_id: str, answer: Annotated[ElicitationResult[Confirmation], Resolve(ask_to_delete)]) -> str:
    """Ask the user to confirm deleting a part (nothing is deleted) and report the answer."""
    if isinstance(answer, AcceptedElicitation):
        return f"{part_id}: {'confirmed' if answer.data.confirm else 'kept'}"
    return f"{part_id}: {answer.action}"


@server.resource("design://catalogue", mime_type="application/json")
def catalogue() -> str:
    """Every part in the design database."""
    return json.dumps([part.model_dump() for part in CATALOGUE])


@server.resource("design://parts/{part_id}", mime_type="application/json")
def part_resource(part_id: str) -> str:
    """One part of the design database."""
    return find_part(part_id, ResourceNotFoundError).model_dump_json()


@server.prompt()
def review_part(part_id: str) -> str:
    """Ask the model for a design review of one part."""
    part = find_part(part_id, partial(MCPError, INVALID_PARAMS))
    return f"Review part {part.id} ({part.name}, {part.material}) for manufacturability and cost."


@server.completion()
async def complete(
    ref: PromptReference | ResourceTemplateReference, argument: CompletionArgument, context: CompletionContext | None
) -> Completion | None:
    """Complete `part_id` for `review_part` and `design://parts/{part_id}`."""
    if argument.name != "part_id":
        return None
    return Completion(values=[part_id for part_id in PARTS if part_id.startswith(argument.value.upper())])


if __name__ == "__main__":
    main(server)
