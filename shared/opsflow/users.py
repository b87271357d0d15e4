"""People who act in opsflow: reviewers, supervisors and operators, with bearer tokens.

A token is ``ofu_<user id>_<secret>`` with a 32-byte random secret. As for API
keys (``opsflow.apikeys``), only the SHA-256 digest of the whole token is
stored (``opsflow_users``, migration 0005): the token has 256 bits of entropy,
so a fast unsalted hash cannot be inverted, and checking a request is one
indexed lookup by digest (no byte-by-byte comparison of the secret in Python).
The token is returned once, by ``create_user``, and cannot be recovered; a
lost token means revoking the user and creating a new one.

Roles say what a person may do; the services decide what each role allows
(human tasks, ``opsflow.nodes.human``: reviewers decide first-tier tasks,
supervisors any task, operators only look).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg

from opsflow.apikeys import hash_key as hash_token
from opsflow.db import requires_table
from opsflow.errors import BadInputError

TOKEN_PREFIX = "ofu_"
# A name is typed on the command line and shown in listings: a plain handle.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
_COLUMNS = "user_id, name, display_name, role, created_at, revoked_at"


class Role(StrEnum):
    """What a person is trusted with."""

    REVIEWER = "reviewer"
    SUPERVISOR = "supervisor"
    OPERATOR = "operator"


@dataclass(frozen=True)
class User:
    """A stored user, without their token."""

    user_id: str
    name: str
    display_name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """Whether the user's token still authenticates."""
        return self.revoked_at is None


@dataclass(frozen=True)
class CreatedUser:
    """A user just created: ``token`` is their bearer token, shown this once."""

    user: User
    token: str


def user_of_row(row: tuple[Any, ...]) -> User:
    """The user a row of ``user_columns`` holds."""
    user_id, name, display_name, role, created_at, revoked_at = row
    return User(user_id, name, display_name, Role(role), created_at, revoked_at)


def user_columns(table: str) -> str:
    """The columns ``user_of_row`` reads, qualified by ``table`` (a name or an alias), for a
    query that joins the users table (``opsflow.web.sessions``)."""
    return ", ".join(f"{table}.{column.strip()}" for column in _COLUMNS.split(","))


def create_user(
    conn: psycopg.Connection[Any], name: str, role: Role, *, display_name: str | None = None
) -> CreatedUser:
    """Create a user and return them with their token, which is not kept.

    Args:
        name: a unique handle (letters, digits, ``.``, ``_``, ``@``, ``-``).
        role: what they may do.
        display_name: how events and screens name them; ``name`` if omitted.

    Raises:
        BadInputError: the name is not a plain handle, is taken, or the display
            name is blank.
        ConfigurationError: the database has no users table (migrations not applied).
    """
    if not _NAME.fullmatch(name):
        raise BadInputError(
            f"user name {name!r} is not 1-100 letters, digits, '.', '_', '@' or '-' "
            "starting with a letter or digit"
        )
    shown = (display_name if display_name is not None else name).strip()
    if not shown or len(shown) > 200:
        raise BadInputError("the display name must be 1-200 characters")
    user_id = f"usr_{secrets.token_hex(6)}"
    token = f"{TOKEN_PREFIX}{user_id}_{secrets.token_urlsafe(32)}"
    try:
        with requires_table("opsflow_users"):
            row = conn.execute(
                "INSERT INTO opsflow_users (user_id, name, display_name, role, token_hash)"
                f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (user_id, name, shown, role.value, hash_token(token)),
            ).fetchone()
    except psycopg.errors.UniqueViolation as err:
        conn.rollback()
        raise BadInputError(f"a user named {name!r} exists already") from err
    conn.commit()
    assert row is not None
    return CreatedUser(user_of_row(row), token)


def list_users(conn: psycopg.Connection[Any]) -> list[User]:
    """Every user, oldest first, revoked ones included."""
    with requires_table("opsflow_users"):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM opsflow_users ORDER BY created_at, user_id"
        ).fetchall()
    conn.commit()
    return [user_of_row(row) for row in rows]


def revoke_user(conn: psycopg.Connection[Any], name: str) -> User:
    """Revoke a user at once (by name or user id): their token, and every session they signed in
    to a page with (``opsflow.web.sessions`` checks the user on each request); a second
    revocation keeps the first time.

    Raises:
        BadInputError: no user has this name or id.
    """
    with requires_table("opsflow_users"):
        row = conn.execute(
            "UPDATE opsflow_users SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE name = %s OR user_id = %s RETURNING {_COLUMNS}",
            (name, name),
        ).fetchone()
    conn.commit()
    if row is None:
        raise BadInputError(f"no user is named {name!r}; `opsflow users list` shows them")
    return user_of_row(row)


def verify_token(conn: psycopg.Connection[Any], presented: str) -> User | None:
    """The active user holding ``presented``, or None for an unknown or revoked token.

    Does not commit: callers run it on a pooled or autocommit connection.
    """
    if not presented.startswith(TOKEN_PREFIX):
        return None  # not one of ours: skip the lookup
    with requires_table("opsflow_users"):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM opsflow_users WHERE token_hash = %s AND revoked_at IS NULL",
            (hash_token(presented),),
        ).fetchone()
    return user_of_row(row) if row else None
