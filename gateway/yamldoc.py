"""YAML documents that remember where each value came from.

Configuration errors must name the file, the field and the line. PyYAML's composed node tree keeps
positions; we keep it next to the plain data and look lines up by field path. Duplicate mapping keys,
which PyYAML silently resolves by keeping the last one, are reported as errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FieldPath = Sequence[str | int]


@dataclass(frozen=True)
class Problem:
    """One configuration error: where it is and what is wrong."""

    file: Path
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.field or '(document)'}: {self.message}"


def format_field(path: FieldPath) -> str:
    """`["connectors", "db", "tools", 0]` -> `connectors.db.tools[0]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class Document:
    """A parsed YAML file: its data and its node tree (for line numbers)."""

    path: Path
    data: Any
    root: yaml.Node | None

    def line(self, path: FieldPath) -> int | None:
        """1-based line of the value at `path`, or of its nearest existing parent."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            node, line = child, child.start_mark.line + 1
        return line

    def problem(self, path: FieldPath, message: str) -> Problem:
        return Problem(self.path, format_field(path), message, self.line(path))


def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def _duplicate_keys(doc: Document, node: yaml.Node | None, path: list[str | int]) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    problems.append(
                        Problem(doc.path, format_field([*path, key.value]), "duplicate key", key.start_mark.line + 1)
                    )
                seen.add(key.value)
                problems += _duplicate_keys(doc, value, [*path, key.value])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(doc, item, [*path, index])
    return problems


def load(path: Path, display: Path | None = None) -> tuple[Document, list[Problem]]:
    """Parse one YAML file. Returns the document and the problems found while parsing."""
    shown = display or path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Document(shown, None, None), [Problem(shown, "", f"cannot read file: {exc}")]
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        return Document(shown, None, None), [Problem(shown, "", f"invalid YAML: {reason}", line)]
    doc = Document(shown, data, root)
    return doc, _duplicate_keys(doc, root, [])
