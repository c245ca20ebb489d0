"""Agent tokens: minted once, stored as hashes, fingerprinted with a gateway-local key.

A token is `encl_` + 43 URL-safe characters (256 random bits); the prefix lets secret scanners find leaked
tokens. The state database holds only SHA-256 hashes (the token has full entropy, so a plain hash is
safe). Logs and audit rows name a token by its fingerprint, an HMAC under the gateway key, so that even a
stranger's credential pasted as a bearer token is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_PREFIX = "encl_"
KEY_FILE = "gateway.key"


def mint() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(key: bytes, value: str | bytes) -> str:
    """First 12 hex characters of HMAC-SHA256(key, value): names a value without revealing it."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hmac.digest(key, data, "sha256").hex()[:12]


def ensure_state_dir(state_dir: Path) -> Path:
    """Create the state directory private to this user (it holds the key, the database, the control socket)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state_dir


def load_or_create_key(state_dir: Path) -> bytes:
    path = ensure_state_dir(state_dir) / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        return key
