"""What operators did: every action taken from the console, with who took it and how it ended.

An operator action changes what the system does (a redrive writes records
back to a topic every consumer reads), so it is recorded before it runs,
naming the authenticated person (``opsflow.users``: id, display name, role),
what they did and to what; when it ends its outcome is added. A row without
an outcome is an action that never finished (the process died mid-way): the
record says so instead of losing it. The table (``operator_actions``,
migration 0014) is written only here, and rows are never deleted.

Each step is its own committed transaction on purpose: the record of an action
must survive the action failing, which one transaction around both would roll
back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from opsflow.db import requires_table
from opsflow.users import User

_COLUMNS = "action_id, started_at, user_id, actor, role, action, target, ended_at, outcome, detail"


@dataclass(frozen=True)
class OperatorAction:
    """One recorded action (``outcome`` None: not finished, or it never will)."""

    action_id: str
    started_at: datetime
    user_id: str
    actor: str
    role: str
    action: str
    target: str
    ended_at: datetime | None
    outcome: str | None
    detail: dict[str, Any] | None


def _action(row: tuple[Any, ...]) -> OperatorAction:
    action_id, *rest = row
    return OperatorAction(str(action_id), *rest)


def begin(conn: psycopg.Connection[Any], user: User, action: str, target: str) -> str:
    """Record that ``user`` starts ``action`` on ``target``; the action's id.

    Raises:
        ConfigurationError: the table is missing (migrations not applied).
    """
    action_id = str(uuid.uuid4())
    with requires_table("operator_actions"), conn.transaction():
        conn.execute(
            "INSERT INTO operator_actions (action_id, user_id, actor, role, action, target)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (action_id, user.user_id, user.display_name, user.role.value, action, target),
        )
    return action_id


def finish(
    conn: psycopg.Connection[Any], action_id: str, outcome: str, detail: dict[str, Any]
) -> None:
    """Record how the action ended: ``outcome`` in words, ``detail`` as data. Once only."""
    with conn.transaction():
        conn.execute(
            "UPDATE operator_actions SET ended_at = now(), outcome = %s, detail = %s"
            " WHERE action_id = %s AND outcome IS NULL",
            (outcome, Jsonb(detail), action_id),
        )


def get(conn: psycopg.Connection[Any], action_id: str) -> OperatorAction | None:
    try:
        uuid.UUID(action_id)
    except ValueError:
        return None
    with requires_table("operator_actions"):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM operator_actions WHERE action_id = %s", (action_id,)
        ).fetchone()
    return _action(row) if row else None


def recent(
    conn: psycopg.Connection[Any], *, target: str | None = None, limit: int = 50
) -> list[OperatorAction]:
    """The latest actions, newest first (on ``target`` only, if given)."""
    with requires_table("operator_actions"):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM operator_actions"
            " WHERE %(target)s::text IS NULL OR target = %(target)s"
            " ORDER BY started_at DESC LIMIT %(limit)s",
            {"target": target, "limit": limit},
        ).fetchall()
    return [_action(row) for row in rows]
