"""API keys: how producers prove who they are to the ingest service.

A key is ``ofk_<key id>_<secret>``: the key id is a public handle (shown by
``opsflow keys list``, used to revoke), the secret 32 random bytes. Only the
SHA-256 digest of the whole key is stored (``opsflow_api_keys``, migration
0002). A fast unsalted hash is enough here because the key has 256 bits of
entropy: nobody can invert or brute-force the digest, unlike a password, which
is why password hashes are slow and salted. It also makes verification one
indexed lookup by digest, so the secret is never compared byte by byte in
Python (no timing side channel on the secret).

The key itself is returned once, by ``create_key``, and cannot be recovered.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from opsflow.db import requires_table
from opsflow.errors import BadInputError

KEY_PREFIX = "ofk_"
# A producer name ends up in every event's envelope and in logs: keep it a
# plain identifier.
_PRODUCER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    key_id: str
    producer: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """Whether the key still authenticates."""
        return self.revoked_at is None


@dataclass(frozen=True)
class CreatedKey:
    """A key just created: ``secret`` is the full key, shown this once."""

    key: ApiKey
    secret: str


def hash_key(presented: str) -> bytes:
    """The digest stored for a key (see the module docstring for why SHA-256 suffices)."""
    return hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()


def check_producer_name(producer: str) -> str:
    """The producer name if it is a plain identifier, which is what envelopes carry.

    Raises:
        BadInputError: empty, longer than 100 characters, or with other characters
            than letters, digits, ``.``, ``_`` and ``-``.
    """
    if not _PRODUCER_NAME.fullmatch(producer):
        raise BadInputError(
            f"producer name {producer!r} is not 1-100 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit"
        )
    return producer


def create_key(conn: psycopg.Connection[Any], producer: str) -> CreatedKey:
    """Create a key for ``producer`` and return it with its secret, which is not kept.

    Raises:
        BadInputError: the producer name is not a plain identifier.
        ConfigurationError: the database has no keys table (migrations not applied).
    """
    check_producer_name(producer)
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with requires_table("opsflow_api_keys"):
        row = conn.execute(
            "INSERT INTO opsflow_api_keys (key_id, producer, key_hash) VALUES (%s, %s, %s)"
            " RETURNING key_id, producer, created_at, revoked_at",
            (key_id, producer, hash_key(secret)),
        ).fetchone()
    conn.commit()
    assert row is not None
    return CreatedKey(ApiKey(*row), secret)


def list_keys(conn: psycopg.Connection[Any]) -> list[ApiKey]:
    """Every key, oldest first, revoked ones included."""
    with requires_table("opsflow_api_keys"):
        rows = conn.execute(
            "SELECT key_id, producer, created_at, revoked_at FROM opsflow_api_keys"
            " ORDER BY created_at, key_id"
        ).fetchall()
    conn.commit()
    return [ApiKey(*row) for row in rows]


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> ApiKey:
    """Revoke a key at once; revoking a revoked key keeps its first revocation time.

    Raises:
        BadInputError: no key has this id.
    """
    with requires_table("opsflow_api_keys"):
        row = conn.execute(
            "UPDATE opsflow_api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE key_id = %s RETURNING key_id, producer, created_at, revoked_at",
            (key_id,),
        ).fetchone()
    conn.commit()
    if row is None:
        raise BadInputError(f"no API key has the id {key_id!r}; `opsflow keys list` shows them")
    return ApiKey(*row)


def verify_key(conn: psycopg.Connection[Any], presented: str) -> ApiKey | None:
    """The active key matching ``presented``, or None for an unknown or revoked key.

    Does not commit: callers run it on a pooled or autocommit connection.
    """
    if not presented.startswith(KEY_PREFIX):
        return None  # not one of ours: skip the lookup
    with requires_table("opsflow_api_keys"):
        row = conn.execute(
            "SELECT key_id, producer, created_at, revoked_at FROM opsflow_api_keys"
            " WHERE key_hash = %s AND revoked_at IS NULL",
            (hash_key(presented),),
        ).fetchone()
    return ApiKey(*row) if row else None
