"""`enclave adopt`: a client's own MCP servers become the gateway's connectors.

For each server: `connectors/NAME.yaml` with the same command, arguments and environment (or URL and headers); every
inline secret moved into the secrets directory (one file each, mode 600) and replaced by a `${secret:NAME}`
reference; the connector added to the enclave with the tools the operator chose to expose. The whole configuration
is then loaded and checked; if it does not pass, everything written is undone and nothing else changes. (The caller
rewrites the client's file afterwards, once this has succeeded.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, ConfigError, load_config
from gateway.discovery import CLIENT_REFERENCE, Found, is_inline_secret, secret_args, url_secrets
from gateway.tokens import ensure_state_dir

CONNECTOR_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The client-side references `adopt` can resolve from its own environment: ${VAR}, ${env:VAR}, ${VAR:-default}.
ENV_REFERENCE = re.compile(r"\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
AUTH_SCHEME = re.compile(r"^(Bearer|Basic|token)\s+(.+)$", re.IGNORECASE)


class AdoptError(Exception):
    """A server cannot be adopted as it is, or the result would not be a valid configuration; the message says why."""


@dataclass
class Plan:
    """One server's connector, before anything is written. `secrets` maps secret names to values (never printed)."""

    found: Found
    connector: str
    document: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


def connector_name(server: str) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", server.lower()).strip("-_")[:63]
    if not CONNECTOR_NAME.match(name):
        raise AdoptError(f"server name {server!r} makes no connector name; rename it in the client's file")
    return name


def plan(found: Found, taken: set[str], environ: Mapping[str, str] = os.environ) -> Plan:
    """The connector for one of a client's servers; AdoptError if it cannot be adopted as it is."""
    name = connector_name(found.name)
    if name in taken:
        raise AdoptError(f"a connector named {name!r} already exists (connectors/{name}.yaml)")
    result = Plan(found, name, {"name": name, "description": f"adopted from {found.client} ({found.file})"})
    spec = found.spec
    if found.transport == "http":
        if spec.get("type") == "sse" or str(spec.get("transport", "")).lower() == "sse":
            raise AdoptError("it uses the deprecated HTTP+SSE transport; connectors speak streamable HTTP")
        url = str(spec.get("url") or spec.get("serverUrl"))
        if not url.startswith(("http://", "https://")) or CLIENT_REFERENCE.search(url) or url_secrets(url)[1]:
            raise AdoptError(
                "its URL is not a plain http(s) URL without credentials; put credentials in a header and adopt again"
            )
        headers = {key: _value(result, key, str(value), environ) for key, value in (spec.get("headers") or {}).items()}
        result.document["http"] = {"url": url, **({"headers": headers} if headers else {})}
        return result
    command = str(spec["command"])
    args = [str(arg) for arg in spec.get("args") or []]
    if secret_args(args) or any(CLIENT_REFERENCE.search(arg) for arg in [command, *args]):
        raise AdoptError(
            "its command line carries a credential or a variable; the gateway passes credentials only in the "
            "environment: move it into the entry's env and adopt again"
        )
    stdio: dict[str, Any] = {"command": command}
    if args:
        stdio["args"] = args
    if env := {key: _value(result, key, str(value), environ) for key, value in (spec.get("env") or {}).items()}:
        stdio["env"] = env
    if isinstance(cwd := spec.get("cwd"), str) and Path(cwd).is_absolute():
        stdio["cwd"] = cwd
    result.document["stdio"] = stdio
    return result


def _value(result: Plan, key: str, value: str, environ: Mapping[str, str]) -> str:
    """An env or header value for the connector: an inline secret becomes a `${secret:...}` reference (the value goes
    to the secret store); a variable the client fills in from its environment is filled in from this one."""

    def resolve(match: re.Match[str]) -> str:
        if match.group(1) in environ:
            return environ[match.group(1)]
        if match.group(2) is not None:
            return match.group(2)
        raise AdoptError(
            f"{key} uses {match.group(0)}, which the client fills in from its environment and which is not set here; "
            "set it and adopt again"
        )

    if CLIENT_REFERENCE.search(ENV_REFERENCE.sub("", value)):
        raise AdoptError(f"{key} uses a variable the gateway cannot fill in ({value}), e.g. one the client asks for")
    expanded = ENV_REFERENCE.sub(resolve, value)
    if not is_inline_secret(key, expanded):
        return expanded
    scheme, secret = "", expanded
    if match := AUTH_SCHEME.match(expanded):
        scheme, secret = match.group(1) + " ", match.group(2)
    name = f"{result.connector}-{re.sub(r'[^a-z0-9]+', '-', key.lower()).strip('-')}"
    result.secrets[name] = secret
    return f"{scheme}${{secret:{name}}}"


def apply(config: Config, enclave: str, plans: list[Plan], expose: list[str]) -> None:
    """Write the secrets, the connector files and the enclave's new entries, then check the whole configuration;
    on any failure, undo what was written."""
    settings = config.settings.secrets
    if any(plan.secrets for plan in plans) and "dir" not in settings.sources:
        raise AdoptError(
            "the adopted servers carry inline secrets, and the secrets directory is not among the secret sources "
            "(gateway.yaml: secrets.sources); add 'dir' there first"
        )
    ensure_state_dir(config.settings.state_dir)  # private, before the secrets directory is made in it
    created: list[Path] = []
    enclave_file = config.root / config.enclaves[enclave].source  # (source is relative to the root)
    before = enclave_file.read_text(encoding="utf-8")
    try:
        for each in plans:
            for name, value in each.secrets.items():
                if _write_secret(settings.dir / name, value):
                    created.append(settings.dir / name)
            path = config.root / "connectors" / f"{each.connector}.yaml"
            with path.open("x", encoding="utf-8") as out:
                created.append(path)
                yaml.safe_dump(each.document, out, sort_keys=False, allow_unicode=True)
        add_connectors(enclave_file, {each.connector: {"tools": expose} for each in plans})
        load_config(config.root)
    except (AdoptError, ConfigError, OSError) as exc:
        for path in created:
            path.unlink(missing_ok=True)
        enclave_file.write_text(before, encoding="utf-8")
        if isinstance(exc, ConfigError):
            raise AdoptError(
                "the adopted configuration does not pass the check; nothing was changed:\n" + str(exc)
            ) from None
        if isinstance(exc, FileExistsError):
            raise AdoptError(f"{exc.filename} already exists; nothing was changed") from None
        raise


def _write_secret(path: Path, value: str) -> bool:
    """A secret file of mode 600; False if an identical one is already there (AdoptError if a different one is)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        if path.read_text(encoding="utf-8").rstrip("\r\n") != value:
            raise AdoptError(f"secret file {path} already exists with another value; nothing was changed")
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(value)
    return True


def add_connectors(path: Path, additions: dict[str, dict[str, Any]]) -> None:
    """Add entries to an enclave file's `connectors` mapping, keeping the rest of the text (and its comments) as it
    is; a mapping written in flow style (`connectors: {}`) is rewritten with the whole file."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^connectors:\s*(#.*)?$", line)), None)
    if start is None:
        data = yaml.safe_load(text)
        data["connectors"] = {**(data.get("connectors") or {}), **additions}
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return
    end, indent = start + 1, None
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        if indent is None and lines[end].strip() and not lines[end].lstrip().startswith("#"):
            indent = len(lines[end]) - len(lines[end].lstrip())
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    if not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    block = yaml.safe_dump(additions, sort_keys=False, allow_unicode=True)
    lines[end:end] = [" " * (indent or 2) + line for line in block.splitlines(keepends=True)]
    path.write_text("".join(lines), encoding="utf-8")
