"""Tool arguments checked against the upstream tool's inputSchema before anything is forwarded.

Validators are compiled once per tool definition and kept with the enclave view, so a call costs one
validation and no schema work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import exceptions, validators
from mcp_types import INVALID_PARAMS

from gateway import errors
from gateway.invocation import Denied


class ArgumentValidator:
    def __init__(self, tool: str, schema: Mapping[str, Any]):
        self.tool = tool
        try:
            cls = validators.validator_for(schema)
            cls.check_schema(schema)
            self._validator: Any = cls(schema)
            self._broken: str | None = None
        except exceptions.SchemaError as exc:
            self._validator = None
            self._broken = exc.message

    def validate(self, arguments: Mapping[str, Any] | None) -> None:
        """Raise MCPError (-32602) naming the offending field."""
        if self._validator is None:
            raise Denied(
                INVALID_PARAMS,
                f"Tool {self.tool} cannot be called: its upstream inputSchema is invalid",
                "invalid_upstream_schema",
            )
        error = exceptions.best_match(self._validator.iter_errors(dict(arguments or {})))
        if error is not None:
            field = ".".join(str(part) for part in error.absolute_path)
            if not field and error.validator == "required":
                field = error.message.split("'")[1] if "'" in error.message else ""
            raise errors.invalid_arguments(self.tool, field, _short(error.message))


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"
