"""Property-based tests of the two parsers an attacker or a typo feeds: the agent-facing message decoding (both
request paths) and the configuration loader (threat-principles 4.1 item 9: fuzz the decoder and the config loader,
as Envoy does; 1.2: the Python SDK's crashes on malformed input).

The decoding property runs against the shared world gateway: arbitrary bodies, near-valid JSON-RPC messages of
every method and arbitrary headers, with the fuzz agent's token, another token or none. No reply is a 5xx, a
request without a valid token gets the one 401, and the upstreams receive exactly the calls the audit log shows
as allowed for the fuzz agent (nothing reaches an upstream unless authorised).

A third property holds the redactor's shortcut for long strings to its pattern: no form of a secret survives.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import httpx2
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, load_config
from gateway.redact import MIN_SECRET_LENGTH, REPLACEMENT, SCAN_FIRST_LENGTH, Redactor, variants
from tests.harness import http
from tests.security.conftest import audit
from tests.security.invariants import Deployment, assert_invariants

FORWARDED = ("tools/call", "resources/read", "prompts/get", "completion/complete")
METHODS = (
    *FORWARDED,
    "initialize",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
    "resources/subscribe",
    "subscriptions/listen",
    "server/discover",
    "logging/setLevel",
    "ping",
    "notifications/initialized",
    "notifications/cancelled",
)
NAMES = (
    "echo",
    "search_parts",
    "get_part",
    "export_design",
    "echo_env",
    "wx_forecast",
    "nothing",
    "design://catalogue",
)
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "fuzz", "version": "0"},
}

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES) | st.text(max_size=12), "arguments": json_values},
        optional={"_meta": st.just(ENVELOPE) | json_values, "uri": st.sampled_from(NAMES) | st.text(max_size=12)},
    ),
)
messages = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0") | st.text(max_size=4), "method": st.sampled_from(METHODS) | st.text(max_size=20)},
    optional={"id": st.integers() | st.text(max_size=8) | st.none() | json_values, "params": params},
)
bodies = st.one_of(
    messages.map(lambda message: json.dumps(message).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "MCP-Protocol-Version": st.sampled_from(["2025-11-25", "2026-07-28", "2025-03-26", "1999-01-01", ""]),
        "Mcp-Method": st.sampled_from(METHODS) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126)),
        "Mcp-Name": st.sampled_from(NAMES),
        "Mcp-Session-Id": st.text(alphabet="0123456789abcdef", max_size=32),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", ""]),
        "Accept": st.sampled_from(["application/json, text/event-stream", "application/json", "*/*", ""]),
    },
)


arguments = st.one_of(st.fixed_dictionaries({"text": st.text(max_size=20)}), json_values)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A 2026-07-28 request whose envelope and routing headers agree, so it gets past the transport checks: what
    the gateway decides about it is then the pipeline's (allowed calls do reach the upstream)."""
    method = draw(st.sampled_from((*FORWARDED, "tools/list", "prompts/list")))
    name = draw(st.sampled_from(NAMES))
    params: dict[str, Any] = {"_meta": ENVELOPE}
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if method in ("tools/call", "prompts/get"):
        params |= {"name": name, "arguments": draw(arguments)}
        headers["Mcp-Name"] = name
    elif method == "resources/read":
        params["uri"] = name
        headers["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": draw(st.integers(0, 2**31)), "method": method, "params": params}
    return json.dumps(body).encode(), headers


requests = st.one_of(st.tuples(bodies, headers), well_formed())


def upstream_contacts(world: Deployment) -> int:
    return sum(1 for log in world.logs.values() for message in log.messages() if message["method"] in FORWARDED)


def allowed_for_fuzz(world: Deployment) -> int:
    marks = ", ".join("?" for _ in FORWARDED)
    where = f"agent = 'fuzz' AND decision = 'allow' AND method IN ({marks})"
    return len(audit(world, where, FORWARDED))


def test_no_body_or_header_crashes_or_reaches_an_upstream_unauthorised(world: Deployment) -> None:
    contacts, allowed = upstream_contacts(world), allowed_for_fuzz(world)
    replies: list[httpx2.Response] = []

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=requests, who=st.sampled_from(["fuzz", "fuzz", "fuzz", None, "stranger"]))
    def post(request: tuple[bytes, dict[str, str]], who: str | None) -> None:
        body, extra = request
        sent = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **extra}
        if who is not None:
            token = world.tokens.get(who, "encl_" + "s" * 43)
            sent["Authorization"] = f"Bearer {token}"
        reply = http().post(world.url, content=body, headers=sent)
        assert reply.status_code < 500, (reply.status_code, reply.text[:300])
        if who != "fuzz":
            assert reply.status_code == 401, (reply.status_code, reply.text[:300])
        replies.append(reply)

    post()
    reached = upstream_contacts(world) - contacts
    assert reached == allowed_for_fuzz(world) - allowed
    assert reached > 0  # the property was tested on requests the gateway allows, not only on refusals
    assert_invariants(world, *replies)


# -- the configuration loader ------------------------------------------------------------------------------------

SPECIAL = ["${python}", "${secret:key}", "${env:HOME}", ".", "..", "/", "http://x", "1h", "0s", "*", "\x00", "a\x00b"]
strings = st.sampled_from(SPECIAL) | st.text(max_size=12)
stems = st.sampled_from(["db", "web", "e1", "a1"]) | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,6}", fullmatch=True)
loose = st.recursive(
    scalars | strings,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(stems | strings, children, max_size=3),
    max_leaves=10,
)
lists = st.lists(strings | stems, max_size=3)
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
numbers = st.integers() | st.floats(allow_nan=False)


def connector(stem: str) -> st.SearchStrategy[dict[str, Any]]:
    """Shaped like a connector (so the loader's checks past the schema run), with hostile leaves."""
    stdio = st.fixed_dictionaries(
        {"command": strings},
        optional={"args": lists, "env": st.dictionaries(env_names, strings, max_size=2), "cwd": strings},
    )
    http = st.fixed_dictionaries(
        {"url": strings.map("http://".__add__)}, optional={"headers": st.dictionaries(env_names, strings, max_size=2)}
    )
    return st.fixed_dictionaries(
        {"name": st.just(stem) | stems},
        optional={"stdio": stdio, "http": http, "timeout_seconds": numbers, "max_result_bytes": numbers},
    )


def enclave(stem: str) -> st.SearchStrategy[dict[str, Any]]:
    exposure = st.fixed_dictionaries(
        {},
        optional={
            "tools": lists,
            "resources": lists,
            "prompts": lists,
            "prefix": strings,
            "rename": st.dictionaries(strings, strings, max_size=2),
        },
    )
    chamber = st.fixed_dictionaries(
        {},
        optional={
            "tools": lists,
            "resources": lists,
            "max_grant_ttl": strings,
            "approval": st.sampled_from(["none", "operator", "user", "always"]),
            "approval_wait": strings,
            "approvers": lists,
            "single_use": loose,
        },
    )
    test = st.fixed_dictionaries(
        {"agent": stems}, optional={"allow": lists, "deny": lists, "chamber": lists, "tools": lists}
    )
    return st.fixed_dictionaries(
        {
            "name": st.just(stem) | stems,
            "agents": st.lists(stems, max_size=3),
            "connectors": st.dictionaries(stems, exposure | st.none(), max_size=2),
        },
        optional={
            "chambers": st.dictionaries(stems, chamber, max_size=2),
            "tests": st.lists(test, max_size=2),
            "audit": st.fixed_dictionaries({}, optional={"raw_arguments": loose}),
            "description": loose,
        },
    )


gateway_settings = st.fixed_dictionaries(
    {},
    optional={
        "listen": st.fixed_dictionaries(
            {}, optional={"host": strings, "port": numbers, "public_url": strings, "allowed_hosts": lists}
        ),
        "state_dir": strings,
        "fast_path": loose,
        "secrets": st.fixed_dictionaries({}, optional={"sources": lists, "dir": strings, "env_prefix": strings}),
        "limits": st.dictionaries(
            st.sampled_from(["max_request_bytes", "agent_burst", "max_json_depth", "upstream_timeout_seconds"]),
            numbers | loose,
        ),
    },
)


def document(structured: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """A YAML file: a document of the right shape with hostile leaves, any value, or any text at all."""
    return st.one_of(structured.map(yaml.safe_dump), loose.map(yaml.safe_dump), st.text(max_size=200))


def files(kind: Any) -> st.SearchStrategy[dict[str, str]]:
    """File stem -> YAML text, each document of `kind` (mostly) named after its file."""
    return st.lists(stems, max_size=3, unique=True).flatmap(
        lambda found: st.fixed_dictionaries({stem: document(kind(stem)) for stem in found})
    )


@settings(max_examples=300, deadline=None, database=None)
@given(
    gateway=st.none() | document(gateway_settings),
    connector_files=files(connector),
    enclave_files=files(enclave),
)
def test_any_configuration_loads_or_says_what_is_wrong(
    gateway: str | None, connector_files: dict[str, str], enclave_files: dict[str, str]
) -> None:
    """load_config returns a Config or raises ConfigError listing each problem with its file; it never fails any
    other way, whatever the files hold (policy tests and chambers included)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder, found in (("connectors", connector_files), ("enclaves", enclave_files)):
            (root / folder).mkdir()
            for stem, text in found.items():
                (root / folder / f"{stem}.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
        if gateway is not None:
            (root / "gateway.yaml").write_text(gateway, encoding="utf-8", errors="surrogateescape")
        try:
            config = load_config(root)
        except ConfigError as error:
            assert error.problems
            for problem in error.problems:
                assert str(problem.file) and problem.message
        else:
            assert isinstance(config, Config)


SECRET_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_+/="


@settings(max_examples=200, deadline=None)
@given(
    secrets=st.lists(st.text(SECRET_CHARACTERS, min_size=MIN_SECRET_LENGTH, max_size=40), min_size=1, max_size=6),
    filler=st.text(min_size=SCAN_FIRST_LENGTH, max_size=3 * SCAN_FIRST_LENGTH),
    data=st.data(),
)
def test_a_long_text_is_scrubbed_of_every_form_of_every_secret(secrets: list[str], filler: str, data: Any) -> None:
    """Long strings are searched for each form before the pattern runs (gateway.redact.SCAN_FIRST_LENGTH): that
    shortcut must never let a form or an agent token through, wherever it sits."""
    redactor = Redactor(secrets)
    token = "encl_" + data.draw(st.text(SECRET_CHARACTERS[:-3], min_size=43, max_size=43))
    leak = data.draw(st.sampled_from([token, *sorted(form for secret in secrets for form in variants(secret))]))
    at = data.draw(st.integers(0, len(filler)))
    scrubbed = redactor.text(filler[:at] + leak + filler[at:])
    assert leak not in scrubbed
    assert REPLACEMENT in scrubbed
