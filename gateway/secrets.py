"""Secret references (`${secret:NAME}`) and the sources they resolve from.

Connector files never hold a credential, only a reference. Values are resolved when the gateway starts
(or reloads), live in memory only, and are handed to the redactor so that no echo of them leaves.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SECRET_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
SECRET_REF = re.compile(r"\$\{secret:(" + SECRET_NAME + r")\}")
ANY_REF = re.compile(r"\$\{([^}]*)\}")


class SecretError(Exception):
    """A secret reference that cannot be resolved; the message says why and how to fix it."""


@dataclass(frozen=True)
class SecretSettings:
    sources: tuple[str, ...] = ("env", "dir")
    env_prefix: str = "ENCLAVE_SECRET_"
    dir: Path = Path(".enclave/secrets")
    keyring_service: str = "enclave-gateway"


def referenced_names(text: str) -> list[str]:
    return SECRET_REF.findall(text)


def env_name(settings: SecretSettings, name: str) -> str:
    """`github-token` -> `ENCLAVE_SECRET_GITHUB_TOKEN`."""
    return settings.env_prefix + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


@dataclass
class SecretResolver:
    """Resolves secret names from the configured sources, first hit wins."""

    settings: SecretSettings
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def resolve(self, name: str) -> str:
        tried: list[str] = []
        for source in self.settings.sources:
            value, where = getattr(self, f"_from_{source}")(name)
            if value:
                return value
            tried.append(where)
        raise SecretError(f"secret {name!r} not found (looked in {'; '.join(tried)})")

    def expand(self, text: str) -> str:
        """Replace every `${secret:NAME}` in `text` with the secret's value."""
        return SECRET_REF.sub(lambda m: self.resolve(m.group(1)), text)

    def resolve_all(self, names: Iterable[str]) -> dict[str, str]:
        return {name: self.resolve(name) for name in names}

    def _from_env(self, name: str) -> tuple[str | None, str]:
        var = env_name(self.settings, name)
        return self.environ.get(var), f"environment variable {var}"

    def _from_dir(self, name: str) -> tuple[str | None, str]:
        path = self.settings.dir / name
        try:
            info = path.stat()
        except FileNotFoundError:
            return None, f"file {path}"
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"secret file {path} is accessible by other users (mode {stat.filemode(info.st_mode)}); "
                f"run: chmod 600 {path}"
            )
        return path.read_text(encoding="utf-8").rstrip("\r\n"), f"file {path}"

    def _from_keyring(self, name: str) -> tuple[str | None, str]:
        where = f"OS keyring service {self.settings.keyring_service!r}"
        try:
            import keyring  # optional dependency: pip install 'enclave-gateway[keyring]'
        except ImportError as exc:
            raise SecretError(
                "the 'keyring' secret source needs the keyring package: pip install 'enclave-gateway[keyring]'"
            ) from exc
        return keyring.get_password(self.settings.keyring_service, name), where
