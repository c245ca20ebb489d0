"""Configuration as data: gateway settings, connectors and enclaves, checked against schemas/.

A configuration directory holds `gateway.yaml` (optional), `connectors/*.yaml` and `enclaves/*.yaml`.
`load_config` returns a `Config` or raises `ConfigError` listing every problem with file, line and field;
nothing is half-applied.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from jsonschema import Draft202012Validator

from gateway import policy, yamldoc
from gateway.policy import PolicyTest
from gateway.redact import MIN_SECRET_LENGTH
from gateway.secrets import ANY_REF, SECRET_REF, SecretError, SecretResolver, SecretSettings
from gateway.yamldoc import Document, FieldPath, Problem

GLOB_CHARS = re.compile(r"[*?\[]")
DURATION = re.compile(r"^[1-9][0-9]*[smhd]$")  # the same pattern as $defs.duration in enclave.schema.json
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Env vars and headers whose values are credentials: they may only hold secret references.
CREDENTIAL_NAME = re.compile(r"(key|token|secret|passw|credential|auth|cookie|session)", re.IGNORECASE)
# A URI is matched only in canonical form: no dot segments (raw or percent-encoded), no control characters.
_DOT_SEGMENT = re.compile(r"(^|[/\\])\.{1,2}([/\\?#]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def canonical_uri(uri: str) -> str | None:
    decoded = unquote(uri)
    if _DOT_SEGMENT.search(decoded) or _CONTROL.search(decoded) or "\\" in decoded:
        return None
    return uri


def duration_seconds(text: str) -> float | None:
    """`30s`, `15m`, `1h`, `7d` -> seconds; None if `text` is not such a duration."""
    text = text.strip()
    return float(int(text[:-1]) * UNIT_SECONDS[text[-1]]) if DURATION.match(text) else None


class ConfigError(Exception):
    """The configuration is invalid; `problems` says where and why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    public_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()


MCP_PATH = "/mcp"  # where agents reach the gateway's MCP endpoint


def base_url(listen: ListenSettings) -> str:
    """The gateway's URL as agents reach it: `public_url`, else http://HOST:PORT."""
    if listen.public_url:
        return listen.public_url
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return f"http://{host}:{listen.port}"


@dataclass(frozen=True)
class Limits:
    """What one agent or one upstream can make the gateway do (SECURITY.md explains each)."""

    max_request_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    request_read_seconds: float = 30.0
    max_result_bytes: int = 8 * 1024 * 1024
    upstream_timeout_seconds: float = 60.0
    agent_rate_per_second: float = 100.0
    agent_burst: int = 200
    agent_concurrency: int = 32
    agent_sessions: int = 100


@dataclass(frozen=True)
class Settings:
    listen: ListenSettings
    state_dir: Path
    secrets: SecretSettings
    limits: Limits
    fast_path: bool = True
    audit_durability: str = "full"


@dataclass(frozen=True)
class StdioTarget:
    command: str
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: Path


@dataclass(frozen=True)
class HttpTarget:
    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Connector:
    name: str
    target: StdioTarget | HttpTarget
    timeout_seconds: float
    source: Path
    description: str = ""
    max_result_bytes: int = Limits.max_result_bytes

    def secret_names(self) -> set[str]:
        values = self.target.env.values() if isinstance(self.target, StdioTarget) else self.target.headers.values()
        return {name for value in values for name in SECRET_REF.findall(value)}


@dataclass(frozen=True)
class Patterns:
    """Names or globs; an empty set matches nothing (deny by default)."""

    items: tuple[str, ...] = ()

    def matches(self, value: str) -> bool:
        return any(fnmatchcase(value, pattern) for pattern in self.items)

    def literals(self) -> tuple[str, ...]:
        return tuple(p for p in self.items if not GLOB_CHARS.search(p))


@dataclass(frozen=True)
class Exposure:
    """What an enclave exposes of one connector, and under which names."""

    tools: Patterns = Patterns()
    resources: Patterns = Patterns()
    prompts: Patterns = Patterns()
    prefix: str = ""
    rename: dict[str, str] = field(default_factory=dict)

    def exposed_name(self, upstream_name: str) -> str:
        return self.rename.get(upstream_name) or self.prefix + upstream_name

    def exposed_prompt_name(self, upstream_name: str) -> str:
        return self.prefix + upstream_name

    def upstream_tools(self, exposed: str) -> list[str]:
        """The upstream tool names this exposure would show agents as `exposed` (if the upstream lists them)."""
        names = [upstream for upstream, name in self.rename.items() if name == exposed]
        if exposed.startswith(self.prefix) and exposed[len(self.prefix) :] not in self.rename:
            names.append(exposed[len(self.prefix) :])
        return [name for name in names if self.tools.matches(name)]

    def exposes_prompt(self, exposed: str) -> bool:
        return exposed.startswith(self.prefix) and self.prompts.matches(exposed[len(self.prefix) :])


Approval = Literal["none", "operator", "user"]
TargetKind = Literal["tool", "resource"]


@dataclass(frozen=True)
class Chamber:
    """High-value tools (agent-facing names) and resources: each call needs a grant or an approval."""

    name: str
    tools: Patterns = Patterns()
    resources: Patterns = Patterns()
    max_grant_ttl: float = 3600.0
    single_use: bool = False
    approval: Approval = "none"
    approval_wait: float = 60.0
    approvers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditSettings:
    """What the audit log keeps of an enclave's calls (arguments are always kept as an HMAC digest)."""

    raw_arguments: bool = False


@dataclass(frozen=True)
class Enclave:
    name: str
    agents: tuple[str, ...]
    connectors: dict[str, Exposure]
    source: Path
    description: str = ""
    chambers: dict[str, Chamber] = field(default_factory=dict)
    audit: AuditSettings = AuditSettings()
    tests: tuple[PolicyTest, ...] = ()

    def resource_connector(self, uri: str) -> str | None:
        """The connector that serves `uri` for this enclave, or None if the enclave does not expose it."""
        if canonical_uri(uri) is None:
            return None
        return next((name for name, exposure in self.connectors.items() if exposure.resources.matches(uri)), None)

    def chambers_holding(self, kind: TargetKind, target: str) -> list[Chamber]:
        """The chambers a tool (agent-facing name) or resource URI is in: one, or none where the load-time
        check could tell; more than one only through overlapping globs (the gateway then denies)."""
        return [c for c in self.chambers.values() if (c.tools if kind == "tool" else c.resources).matches(target)]


@dataclass(frozen=True)
class Config:
    root: Path
    settings: Settings
    connectors: dict[str, Connector]
    enclaves: dict[str, Enclave]

    def enclave_of(self, agent: str) -> Enclave | None:
        for enclave in self.enclaves.values():
            if agent in enclave.agents:
                return enclave
        return None

    def secret_names(self) -> set[str]:
        return {name for connector in self.connectors.values() for name in connector.secret_names()}


# --------------------------------------------------------------------------- schemas


def schema_dir() -> Path:
    """schemas/ ships inside the wheel as gateway/schemas; in a checkout it sits beside the package."""
    here = Path(__file__).resolve().parent
    packaged = here / "schemas"
    return packaged if packaged.is_dir() else here.parent / "schemas"


@cache
def _validator(kind: str) -> Draft202012Validator:
    schema = json.loads((schema_dir() / f"{kind}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _schema_problems(doc: Document, kind: str) -> list[Problem]:
    problems = []
    for error in sorted(_validator(kind).iter_errors(doc.data), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        # A schema may word a check itself: "x-messages": {"<keyword>": "... {value} ..."}.
        worded = error.schema.get("x-messages", {}).get(error.validator) if isinstance(error.schema, dict) else None
        if worded:
            message = worded.replace("{value}", repr(error.instance))
        elif error.validator == "oneOf" and kind == "connector":
            message = "exactly one of 'stdio' or 'http' is required"
        elif error.validator == "pattern" and error.validator_value == DURATION.pattern:
            message = f"invalid duration {error.instance!r}: use a number and a unit, e.g. 30s, 15m, 1h, 7d"
        elif error.validator == "additionalProperties":
            message = error.message.replace("Additional properties are not allowed", "unknown field(s)")
        else:
            message = error.message
        problems.append(doc.problem(path, message))
    return problems


# --------------------------------------------------------------------------- loading


def load_config(root: Path | str) -> Config:
    """Load and check the configuration directory `root`; raise ConfigError listing every problem."""
    root = Path(root).resolve()
    problems: list[Problem] = []
    if not root.is_dir():
        raise ConfigError([Problem(root, "", "configuration directory does not exist")])

    def read(path: Path, kind: str) -> Document | None:
        doc, found = yamldoc.load(path, display=path.relative_to(root))
        if not found and doc.data is None and kind != "gateway":
            found = [doc.problem([], "file is empty")]
        if not found:
            found = _schema_problems(doc, kind) if doc.data is not None else []
        problems.extend(found)
        return None if found else doc

    gateway_file = root / "gateway.yaml"
    settings_doc = read(gateway_file, "gateway") if gateway_file.exists() else None
    settings = _settings(root, settings_doc.data if settings_doc and settings_doc.data else {})

    connectors: dict[str, Connector] = {}
    for path in sorted((root / "connectors").glob("*.yaml")):
        if doc := read(path, "connector"):
            connector = _connector(root, doc, settings.limits, problems)
            if connector.name in connectors:
                problems.append(doc.problem(["name"], f"connector {connector.name!r} is defined twice"))
            connectors[connector.name] = connector

    enclaves: dict[str, Enclave] = {}
    agent_home: dict[str, str] = {}
    documents: list[Document] = []
    for path in sorted((root / "enclaves").glob("*.yaml")):
        if doc := read(path, "enclave"):
            enclave = _enclave(doc, connectors, agent_home, problems)
            if enclave.name in enclaves:
                problems.append(doc.problem(["name"], f"enclave {enclave.name!r} is defined twice"))
            enclaves[enclave.name] = enclave
            documents.append(doc)

    if problems:
        raise ConfigError(problems)
    config = Config(root, settings, connectors, enclaves)
    failed = [
        doc.problem(*found)
        for doc in documents
        for test in enclaves[doc.data["name"]].tests
        if (found := policy.failure(config, test)) is not None
    ]
    if failed:
        raise ConfigError(list(dict.fromkeys(failed)))  # an unknown agent is reported once, not per target
    return config


def _settings(root: Path, data: dict[str, Any]) -> Settings:
    listen = data.get("listen", {})
    state_dir = (root / data.get("state_dir", ".enclave")).resolve()
    secrets = data.get("secrets", {})
    limits = data.get("limits", {})
    return Settings(
        listen=ListenSettings(
            host=listen.get("host", "127.0.0.1"),
            port=listen.get("port", 8765),
            public_url=listen.get("public_url"),
            allowed_hosts=tuple(listen.get("allowed_hosts", ())),
            allowed_origins=tuple(listen.get("allowed_origins", ())),
        ),
        state_dir=state_dir,
        secrets=SecretSettings(
            sources=tuple(secrets.get("sources", ("env", "dir"))),
            env_prefix=secrets.get("env_prefix", "ENCLAVE_SECRET_"),
            dir=(root / secrets["dir"]).resolve() if "dir" in secrets else state_dir / "secrets",
            keyring_service=secrets.get("keyring_service", "enclave-gateway"),
        ),
        limits=Limits(**limits),  # the schema admits only Limits' fields
        fast_path=data.get("fast_path", True),
        audit_durability=data.get("audit_durability", "full"),
    )


def _check_name_matches_file(doc: Document, problems: list[Problem]) -> None:
    if doc.data["name"] != doc.path.stem:
        problems.append(doc.problem(["name"], f"name {doc.data['name']!r} must match the file name {doc.path.name!r}"))


def _check_values(
    doc: Document, base: FieldPath, values: dict[str, str], problems: list[Problem], *, kind: str
) -> None:
    """Only `${secret:NAME}` references are allowed, and credential-like names must use them."""
    for name, value in values.items():
        path = [*base, name]
        for ref in ANY_REF.findall(value):
            if not SECRET_REF.fullmatch("${" + ref + "}"):
                problems.append(doc.problem(path, f"unknown reference ${{{ref}}}; use ${{secret:NAME}}"))
        if CREDENTIAL_NAME.search(name) and not SECRET_REF.search(value):
            problems.append(
                doc.problem(path, f"{kind} {name!r} looks like a credential: give it as ${{secret:NAME}}, not inline")
            )


def _connector(root: Path, doc: Document, limits: Limits, problems: list[Problem]) -> Connector:
    data = doc.data
    _check_name_matches_file(doc, problems)
    target: StdioTarget | HttpTarget
    if "stdio" in data:
        stdio = data["stdio"]
        command = stdio["command"].replace("${python}", sys.executable)
        args = tuple(stdio.get("args", ()))
        for index, arg in enumerate(args):
            if ANY_REF.search(arg):
                problems.append(
                    doc.problem(["stdio", "args", index], "references are not allowed in args; pass secrets in env")
                )
        if ANY_REF.search(command):
            problems.append(doc.problem(["stdio", "command"], "only ${python} may be used in command"))
        env = dict(stdio.get("env", {}))
        _check_values(doc, ["stdio", "env"], env, problems, kind="environment variable")
        cwd = (root / stdio.get("cwd", ".")).resolve()
        if not cwd.is_dir():
            problems.append(doc.problem(["stdio", "cwd"], f"directory {cwd} does not exist"))
        target = StdioTarget(command, args, env, cwd)
    else:
        http = data["http"]
        headers = dict(http.get("headers", {}))
        _check_values(doc, ["http", "headers"], headers, problems, kind="header")
        if ANY_REF.search(http["url"]):
            problems.append(doc.problem(["http", "url"], "references are not allowed in the URL; use a header"))
        target = HttpTarget(http["url"], headers)
    return Connector(
        name=data["name"],
        target=target,
        timeout_seconds=float(data.get("timeout_seconds", limits.upstream_timeout_seconds)),
        source=doc.path,
        description=data.get("description", ""),
        max_result_bytes=data.get("max_result_bytes", limits.max_result_bytes),
    )


def _enclave(
    doc: Document, connectors: dict[str, Connector], agent_home: dict[str, str], problems: list[Problem]
) -> Enclave:
    data = doc.data
    _check_name_matches_file(doc, problems)
    for index, agent in enumerate(data["agents"]):
        if agent in agent_home:
            problems.append(
                doc.problem(["agents", index], f"agent {agent!r} already belongs to enclave {agent_home[agent]!r}")
            )
        agent_home.setdefault(agent, data["name"])

    exposures: dict[str, Exposure] = {}
    for connector_name, spec in data["connectors"].items():
        base = ["connectors", connector_name]
        if connector_name not in connectors:
            problems.append(
                doc.problem(base, f"unknown connector {connector_name!r} (no connectors/{connector_name}.yaml)")
            )
        spec = spec or {}
        exposure = Exposure(
            tools=Patterns(tuple(spec.get("tools", ()))),
            resources=Patterns(tuple(spec.get("resources", ()))),
            prompts=Patterns(tuple(spec.get("prompts", ()))),
            prefix=spec.get("prefix", ""),
            rename=dict(spec.get("rename", {})),
        )
        for upstream_name in exposure.rename:
            if not exposure.tools.matches(upstream_name):
                problems.append(
                    doc.problem(
                        [*base, "rename", upstream_name], f"renames {upstream_name!r}, which 'tools' does not expose"
                    )
                )
        exposures[connector_name] = exposure

    # Names known at load time must be unique inside the enclave; globbed names are checked when listed.
    exposed: dict[str, str] = {}
    for connector_name, exposure in exposures.items():
        literal = {*exposure.tools.literals(), *exposure.rename}
        for upstream_name in sorted(literal):
            name = exposure.exposed_name(upstream_name)
            if name in exposed and exposed[name] != f"{connector_name}.{upstream_name}":
                problems.append(
                    doc.problem(
                        ["connectors", connector_name, "tools"],
                        f"tool name collision: {name!r} is exposed by both {exposed[name]} and "
                        f"{connector_name}.{upstream_name}; use 'prefix' or 'rename'",
                    )
                )
            exposed.setdefault(name, f"{connector_name}.{upstream_name}")
    chambers = _chambers(doc, exposures, set(exposed), problems)
    audit = AuditSettings(raw_arguments=data.get("audit", {}).get("raw_arguments", False))
    tests = tuple(
        PolicyTest(spec["agent"], expect, target, ("tests", index, expect, position))
        for index, spec in enumerate(data.get("tests", ()))
        for expect in policy.DECISIONS
        for position, target in enumerate(spec.get(expect, ()))
    )
    return Enclave(
        data["name"], tuple(data["agents"]), exposures, doc.path, data.get("description", ""), chambers, audit, tests
    )


def _chambers(
    doc: Document, exposures: dict[str, Exposure], exposed_tools: set[str], problems: list[Problem]
) -> dict[str, Chamber]:
    """The enclave's chambers; their patterns must cover something the enclave exposes (where that can be
    known before the upstreams are listed), and a tool or resource belongs to at most one chamber."""
    chambers: dict[str, Chamber] = {}
    for name, spec in (doc.data.get("chambers") or {}).items():
        base = ["chambers", name]
        chamber = Chamber(
            name=name,
            tools=Patterns(tuple(spec.get("tools", ()))),
            resources=Patterns(tuple(spec.get("resources", ()))),
            max_grant_ttl=duration_seconds(spec.get("max_grant_ttl", "1h")) or 0.0,
            single_use=spec.get("single_use", False),
            approval=spec.get("approval", "none"),
            approval_wait=duration_seconds(spec.get("approval_wait", "60s")) or 0.0,
            approvers=tuple(spec.get("approvers", ())),
        )
        if not chamber.tools.items and not chamber.resources.items:
            problems.append(doc.problem(base, "a chamber needs 'tools' or 'resources' (or both)"))
        if chamber.approvers and chamber.approval != "operator":
            problems.append(doc.problem([*base, "approvers"], "approvers apply only to 'approval: operator'"))
        if chamber.approval != "none" and chamber.approval_wait > chamber.max_grant_ttl:
            problems.append(
                doc.problem([*base, "approval_wait"], "must not exceed max_grant_ttl (how long a request stays open)")
            )
        for index, pattern in enumerate(chamber.tools.items):
            if not _may_expose_tool(pattern, exposures, exposed_tools):
                problems.append(
                    doc.problem(
                        [*base, "tools", index],
                        f"{pattern!r} matches no tool this enclave exposes (use the names agents see, "
                        "after rename/prefix)",
                    )
                )
        for index, pattern in enumerate(chamber.resources.items):
            patterns = [p for exposure in exposures.values() for p in exposure.resources.items]
            if not any(fnmatchcase(pattern, p) or fnmatchcase(p, pattern) for p in patterns):
                problems.append(
                    doc.problem([*base, "resources", index], f"{pattern!r} matches no resource this enclave exposes")
                )
        chambers[name] = chamber

    for kind, literals in (
        ("tools", exposed_tools | {p for c in chambers.values() for p in c.tools.literals()}),
        ("resources", {p for c in chambers.values() for p in c.resources.literals()}),
    ):
        for value in sorted(literals):
            owners = [c.name for c in chambers.values() if getattr(c, kind).matches(value)]
            if len(owners) > 1:
                problems.append(
                    doc.problem(
                        ["chambers", owners[1], kind],
                        f"{value!r} is also in chamber {owners[0]!r}; it may belong to one chamber only",
                    )
                )
    return chambers


def _may_expose_tool(pattern: str, exposures: dict[str, Exposure], exposed_tools: set[str]) -> bool:
    """Whether an agent-facing tool name (or glob) can match a tool of the enclave. Names exposed by a glob
    are known only once the upstream is listed: a literal is checked against what the glob could produce,
    a chamber glob is given the benefit of the doubt."""
    if any(fnmatchcase(name, pattern) for name in exposed_tools):
        return True
    globs = [(e.prefix, p) for e in exposures.values() for p in e.tools.items if GLOB_CHARS.search(p)]
    if GLOB_CHARS.search(pattern):
        return bool(globs)
    return any(pattern.startswith(prefix) and fnmatchcase(pattern[len(prefix) :], glob) for prefix, glob in globs)


def resolve_secrets(config: Config) -> tuple[SecretResolver, list[str], list[Problem]]:
    """Resolve every referenced secret; problems name the connector file and field that references it."""
    resolver = SecretResolver(config.settings.secrets)
    values: list[str] = []
    problems: list[Problem] = []
    for connector in config.connectors.values():
        target = connector.target
        section, fields = (
            ("stdio.env", target.env) if isinstance(target, StdioTarget) else ("http.headers", target.headers)
        )
        for key, value in fields.items():
            for name in SECRET_REF.findall(value):
                where = f"{section}.{key}"
                try:
                    secret = resolver.resolve(name)
                except SecretError as exc:
                    problems.append(Problem(connector.source, where, str(exc)))
                    continue
                if len(secret) < MIN_SECRET_LENGTH:
                    problems.append(
                        Problem(
                            connector.source, where, f"secret {name!r} is shorter than {MIN_SECRET_LENGTH} characters"
                        )
                    )
                values.append(secret)
    return resolver, values, problems
