"""Bearer tokens held as hashes: the tokens file and `splitlora-server tokens add|remove`.

The tokens file is a YAML (or JSON) mapping of identity -> `sha256:<hex>` (a bare 64-digit hex, quoted in
YAML, is read the same way). Tokens are 256-bit random strings, so an unsalted SHA-256 cannot be reversed by
guessing: the file reveals no token, but only its owner should be able to change it. The identity `admin`
holds the admin credential.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.atomic import atomic_write_bytes
from common.config.engine import ConfigError, option
from splitlora_server.registry import CLIENT_ID_PATTERN

PREFIX = "sha256:"
_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _parse_hash(path: Path, identity: str, value: object) -> str:
    text = str(value).strip().lower()
    digest = text.removeprefix(PREFIX)
    if not _HEX.match(digest):
        raise ConfigError(f"{path}: the entry of {identity!r} is not a token hash ({PREFIX}<64 hex digits>); "
                          "create entries with `splitlora-server tokens add ID --tokens-file FILE`")
    return PREFIX + digest


def _read_entries(path: Path) -> dict[str, str]:
    """identity -> hash from the tokens file (empty if it does not exist)."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable tokens file: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of identity: {PREFIX}<hex>, got {type(data).__name__}")
    entries = {}
    for identity, value in data.items():
        identity = str(identity)
        if not CLIENT_ID_PATTERN.match(identity):
            raise ConfigError(f"{path}: {identity!r} is not a valid identity (1-64 letters, digits, '.', '_', '-')")
        entries[identity] = _parse_hash(path, identity, value)
    return entries


class TokenStore:
    """Looks up the identity a presented token belongs to."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._by_hash: dict[str, str] = {}
        for identity, digest in entries.items():
            if digest in self._by_hash:
                raise ConfigError(f"identities {self._by_hash[digest]!r} and {identity!r} share one token")
            self._by_hash[digest] = identity

    @classmethod
    def load(cls, path: str | Path) -> "TokenStore":
        """Read a tokens file; ConfigError if it is missing or malformed."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokens file {path} does not exist; create it with "
                              "`splitlora-server tokens add ID --tokens-file FILE`")
        return cls(_read_entries(path))

    def identity_of(self, token: str) -> str | None:
        """The identity holding `token`, or None."""
        return self._by_hash.get(hash_token(token))


def _save(path: Path, entries: dict[str, str]) -> None:
    text = ("# splitlora bearer tokens: identity -> sha256 of the token (the tokens themselves are not stored)\n"
            + yaml.safe_dump(entries, sort_keys=True))
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o600)


@dataclass
class TokenRemoveConfig:
    """`splitlora-server tokens remove ID`: revoke ID's bearer token."""

    identity: str = option(help="Client id, or `admin` for the admin credential.", metavar="ID", positional=True)
    tokens_file: str = option(help="The tokens file the servers check tokens against.", metavar="FILE")

    def validate(self) -> None:
        """A valid identity."""
        if not CLIENT_ID_PATTERN.match(self.identity):
            raise ConfigError(f"{self.identity!r} is not a valid identity (1-64 letters, digits, '.', '_', '-')")


@dataclass
class TokenAddConfig(TokenRemoveConfig):
    """`splitlora-server tokens add ID`: create a bearer token for ID, store its hash, print the token once."""

    replace: bool = option(False, "Replace an existing token of ID (the old one stops working).")


def add_token(cfg: TokenAddConfig) -> str:
    """Create and store a token for `cfg.identity`; return the token (it is not stored anywhere)."""
    path = Path(cfg.tokens_file)
    entries = _read_entries(path)
    if cfg.identity in entries and not cfg.replace:
        raise ConfigError(f"{path} already holds a token for {cfg.identity!r}; give --replace to issue a new one")
    token = secrets.token_urlsafe(32)
    entries[cfg.identity] = hash_token(token)
    _save(path, entries)
    return token


def remove_token(cfg: TokenRemoveConfig) -> None:
    """Revoke the token of `cfg.identity`."""
    path = Path(cfg.tokens_file)
    entries = _read_entries(path)
    if entries.pop(cfg.identity, None) is None:
        raise ConfigError(f"{path} holds no token for {cfg.identity!r}")
    _save(path, entries)
