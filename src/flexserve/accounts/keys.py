"""API keys: how they are made, stored (as a hash) and shown (as a prefix).

A key is ``sk-fs-`` followed by 43 URL-safe characters from ``secrets``: 256
bits of entropy. Keys that strong cannot be guessed from their hash, so a
fast hash (SHA-256) is the right one: a slow password hash would only cost
latency on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-fs-"


def generate_key() -> str:
    """A new secret key; it is shown once and never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes: 43 characters


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def hashes_match(key_hash: str, expected_hash: str) -> bool:
    """Compare two key hashes in constant time."""
    return hmac.compare_digest(key_hash.encode(), expected_hash.encode())


def display_prefix(key: str) -> str:
    """``sk-fs-ab…wxyz``: enough to tell keys apart, too little to use one."""
    return f"{key[:8]}…{key[-4:]}"
