"""K3s join tokens: the secure format K10<sha256 of the CA PEM>::<user>:<password>, or a short one."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "K10"


@dataclass(frozen=True)
class Token:
    ca_hash: str | None
    username: str | None
    password: str

    @property
    def secure(self) -> bool:
        return self.ca_hash is not None


def parse(token: str) -> Token:
    token = token.strip()
    if token.startswith(PREFIX) and "::" in token:
        ca_hash, _, creds = token[len(PREFIX):].partition("::")
        user, sep, password = creds.partition(":")
        if sep:
            return Token(ca_hash.lower(), user, password)
        return Token(ca_hash.lower(), None, creds)
    return Token(None, None, token)


def ca_hash(ca_pem: bytes) -> str:
    return hashlib.sha256(ca_pem).hexdigest()


def secure(ca_pem: bytes, password: str, username: str = "server") -> str:
    return f"{PREFIX}{ca_hash(ca_pem)}::{username}:{password}"


def generate_password() -> str:
    return secrets.token_hex(16)


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
