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

A key speaks for one external producer, never for a service, and sends only
what that producer is declared for (``Event.emitted_by``), narrowed further by
the key's own scope (``opsflow keys create --events``): a shop's key cannot
approve an order or report a delivery.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from opsflow.contracts import Event
from opsflow.db import requires_table
from opsflow.errors import BadInputError

KEY_PREFIX = "ofk_"
# A producer name ends up in every event's envelope and in logs: keep it a
# plain identifier.
_PRODUCER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


_COLUMNS = "key_id, producer, created_at, revoked_at, events"


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret.

    ``events``: the event types it may send, or None for every type whose
    declaration admits its producer (``Event.emitted_by``).
    """

    key_id: str
    producer: str
    created_at: datetime
    revoked_at: datetime | None
    events: tuple[str, ...] | None = None

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> ApiKey:
        key_id, producer, created_at, revoked_at, events = row
        scope = None if events is None else tuple(events)
        return cls(key_id, producer, created_at, revoked_at, scope)

    @property
    def active(self) -> bool:
        """Whether the key still authenticates."""
        return self.revoked_at is None

    def may_send(self, model: type[Event]) -> bool:
        """Whether the key may send events of ``model``: its producer is declared for
        the type as an external producer, and the type is within the key's scope."""
        return model.emitted_by.admits_external(self.producer) and (
            self.events is None or model.event_type in self.events
        )

    def refusal(self, model: type[Event]) -> str:
        """Why the key may not send ``model``'s events, in one line for a 403."""
        if not model.emitted_by.admits_external(self.producer):
            return (
                f"producer {self.producer!r} may not emit {model.event_type}"
                f" (allowed: {model.emitted_by.describe()})"
            )
        return (
            f"the key {self.key_id} of producer {self.producer!r} is scoped to"
            f" {', '.join(self.events or ()) or 'no event type'}, not {model.event_type}"
        )


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


def check_scope(
    producer: str, events: Sequence[str] | None, models: Mapping[str, type[Event]]
) -> tuple[str, ...] | None:
    """The scope of a new key of ``producer`` (``events``, or None: all it is declared
    for), checked against the application's event types ``models``.

    Raises:
        BadInputError: the producer is a service's name (a key would let anyone
            speak for that service), is declared for no event type, or an event
            type is unknown or not one the producer is declared for.
    """
    services = frozenset().union(*(m.emitted_by.services for m in models.values()))
    if producer in services:
        raise BadInputError(
            f"producer {producer!r} is a service of the application; a key cannot speak for it"
        )
    declared = [t for t, m in models.items() if m.emitted_by.admits_external(producer)]
    if not declared:
        raise BadInputError(
            f"producer {producer!r} is declared for no event type; external producers may"
            " send: "
            + "; ".join(
                f"{t} ({m.emitted_by.describe()})"
                for t, m in models.items()
                if m.emitted_by.external
            )
        )
    if events is None:
        return None
    for event_type in events:
        if event_type not in models:
            raise BadInputError(f"no event type {event_type!r}; known: {', '.join(models)}")
        if event_type not in declared:
            raise BadInputError(
                f"producer {producer!r} may not emit {event_type}"
                f" (allowed: {models[event_type].emitted_by.describe()})"
            )
    return tuple(dict.fromkeys(events))


def create_key(
    conn: psycopg.Connection[Any], producer: str, events: Sequence[str] | None = None
) -> CreatedKey:
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
            "INSERT INTO opsflow_api_keys (key_id, producer, key_hash, events)"
            f" VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}",
            (key_id, producer, hash_key(secret), None if events is None else list(events)),
        ).fetchone()
    conn.commit()
    assert row is not None
    return CreatedKey(ApiKey._from_row(row), secret)


def list_keys(conn: psycopg.Connection[Any]) -> list[ApiKey]:
    """Every key, oldest first, revoked ones included."""
    with requires_table("opsflow_api_keys"):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM opsflow_api_keys ORDER BY created_at, key_id"
        ).fetchall()
    conn.commit()
    return [ApiKey._from_row(row) for row in rows]


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> ApiKey:
    """Revoke a key at once; revoking a revoked key keeps its first revocation time.

    Raises:
        BadInputError: no key has this id.
    """
    with requires_table("opsflow_api_keys"):
        row = conn.execute(
            "UPDATE opsflow_api_keys SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE key_id = %s RETURNING {_COLUMNS}",
            (key_id,),
        ).fetchone()
    conn.commit()
    if row is None:
        raise BadInputError(f"no API key has the id {key_id!r}; `opsflow keys list` shows them")
    return ApiKey._from_row(row)


def verify_key(conn: psycopg.Connection[Any], presented: str) -> ApiKey | None:
    """The active key matching ``presented``, or None for an unknown or revoked key.

    Does not commit: callers run it on a pooled or autocommit connection.
    """
    if not presented.startswith(KEY_PREFIX):
        return None  # not one of ours: skip the lookup
    with requires_table("opsflow_api_keys"):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM opsflow_api_keys WHERE key_hash = %s AND revoked_at IS NULL",
            (hash_key(presented),),
        ).fetchone()
    return ApiKey._from_row(row) if row else None
