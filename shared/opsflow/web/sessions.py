"""People's browser sessions: what a signed-in page's cookie stands for, and its CSRF defence.

A person signs in to a page once with their bearer token (``opsflow.users``);
the server then starts a session and the browser keeps only its id. The token
never goes into a cookie: a cookie is sent with every request, stored on disk
by the browser and copied by anyone who gets hold of the profile, and a token
does not expire, so a stolen one works until an administrator revokes it.
A session id does expire, and can be ended by its owner.

Sessions are rows of ``opsflow_sessions`` (migration 0012), not signed cookies:
signing out or revoking the user must end a session at once, also in a copy of
the cookie an attacker took, and only the server can forget a value it signed.
As for tokens, only the SHA-256 digest of the 256-bit random id is stored, so
the table gives nobody a cookie that works. Every check is one statement that
also records the request (``last_seen_at``) and joins the user, so:

- a session idle longer than ``SessionLimits.idle``, or older than
  ``SessionLimits.absolute`` however busy, is over;
- a revoked user's sessions are over at the next request;
- time is the database's clock (``now()``), never a step's test clock, which
  tests move by hours to pass SLAs.

CSRF. A session's pages carry a token in every form (``csrf_token``), derived
from the session id (SHA-256 under a label of its own), so it needs no storage,
changes with every session and cannot be computed without the id, which is in an
``HttpOnly`` cookie no script can read. ``from_this_origin`` adds the check
OWASP recommends beside it: a browser names the page a POST comes from in
``Origin`` (or, failing that, ``Referer``), which another site cannot forge;
it also covers the sign-in form, which has no session yet. ``SameSite=Strict``
stays on the cookie as a third line: a browser that ignores it still meets the
other two.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
from fastapi import Request

from opsflow.db import requires_table
from opsflow.users import User, user_columns, user_of_row

_CSRF_LABEL = b"opsflow csrf token\x00"


@dataclass(frozen=True)
class SessionLimits:
    """How long a session lasts.

    Attributes:
        idle: ends after this long without a request.
        absolute: ends this long after sign-in, however busy.
    """

    idle: timedelta
    absolute: timedelta


@dataclass(frozen=True)
class Session:
    """A live session: its person, and the token its forms must send back."""

    user: User
    csrf_token: str


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


def csrf_token(session_id: str) -> str:
    """The token every form of the session carries (see the module docstring)."""
    return hashlib.sha256(_CSRF_LABEL + session_id.encode("utf-8", "surrogatepass")).hexdigest()


def start_session(
    conn: psycopg.Connection[Any], user: User, *, scope: str, limits: SessionLimits
) -> str:
    """Start a session for ``user`` on ``scope``'s pages and return its id, for the cookie.

    The scope's sessions past their limits are deleted on the way, so the table does
    not grow with every sign-in.

    Raises:
        ConfigurationError: the database has no sessions table (migrations not applied).
    """
    session_id = secrets.token_urlsafe(32)
    with requires_table("opsflow_sessions"), conn.transaction():
        conn.execute(
            "DELETE FROM opsflow_sessions WHERE scope = %s"
            " AND (last_seen_at < now() - %s OR created_at < now() - %s)",
            (scope, limits.idle, limits.absolute),
        )
        conn.execute(
            "INSERT INTO opsflow_sessions (session_hash, scope, user_id) VALUES (%s, %s, %s)",
            (_digest(session_id), scope, user.user_id),
        )
    return session_id


def resume_session(
    conn: psycopg.Connection[Any],
    session_id: str,
    *,
    scope: str,
    limits: SessionLimits,
    touch: bool = True,
) -> Session | None:
    """The live session ``session_id`` of ``scope``, its request recorded; None when there is
    no such session, it is over (idle, too old, signed out) or its user is revoked.

    ``touch=False`` for a request the page made by itself (an open page refreshing its
    queue): it does not count as the person's activity, so a screen left open still
    ends its session after the idle time.
    """
    with requires_table("opsflow_sessions"), conn.transaction():
        row = conn.execute(
            "UPDATE opsflow_sessions s SET last_seen_at ="
            " CASE WHEN %s THEN now() ELSE s.last_seen_at END FROM opsflow_users u"
            " WHERE s.session_hash = %s AND s.scope = %s AND u.user_id = s.user_id"
            " AND u.revoked_at IS NULL"
            " AND s.last_seen_at >= now() - %s AND s.created_at >= now() - %s"
            f" RETURNING {user_columns('u')}",
            (touch, _digest(session_id), scope, limits.idle, limits.absolute),
        ).fetchone()
    return Session(user_of_row(row), csrf_token(session_id)) if row else None


def end_session(conn: psycopg.Connection[Any], session_id: str) -> None:
    """End the session at once: its cookie, and every copy of it, opens nothing any more."""
    with requires_table("opsflow_sessions"), conn.transaction():
        conn.execute("DELETE FROM opsflow_sessions WHERE session_hash = %s", (_digest(session_id),))


def csrf_token_matches(session: Session, presented: str | None) -> bool:
    """Whether a form sent back its session's token (compared in constant time)."""
    return presented is not None and hmac.compare_digest(
        session.csrf_token.encode(), presented.encode("utf-8", "surrogatepass")
    )


def from_this_origin(request: Request) -> bool:
    """Whether a browser says the request comes from a page of this server.

    ``Origin`` is compared with the ``Host`` the request was sent to (scheme left
    out: behind a proxy that ends TLS the server sees http while the browser's
    origin is https); without ``Origin``, the origin of ``Referer``. A request
    with neither is refused: every current browser sends ``Origin`` with a form
    POST (the pages' ``Referrer-Policy: same-origin`` keeps it for their own
    forms), so only a request built by hand lacks both.
    """
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not host or not origin or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == host
