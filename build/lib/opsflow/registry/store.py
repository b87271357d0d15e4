"""The registry's state in PostgreSQL, and the Confluent rules that guard it.

Every rule a Confluent client can observe lives here (which id a schema gets,
when a version is created, soft then permanent deletes, which error code a
failure carries), so the HTTP layer only translates. Writes take one
transaction-scoped advisory lock: registrations are rare, and serialising them
is what lets two concurrent registrations of one schema agree on its id, even
from several registry processes sharing the database.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import avro.schema
import psycopg
from psycopg_pool import ConnectionPool

from opsflow.compatibility import CompatibilityLevel, incompatibilities, parse_schema

# An arbitrary constant: the advisory lock key serialising registry writes.
_WRITE_LOCK_KEY = 0x5C4E3A
# The global compatibility level is stored under this subject name, which
# Confluent never gives a real subject.
_GLOBAL = ""
DEFAULT_LEVEL = CompatibilityLevel.BACKWARD
_MAX_VERSION = 2**31 - 1

Pool = ConnectionPool[psycopg.Connection[tuple[Any, ...]]]


class RegistryError(Exception):
    """A failure with Confluent's HTTP status and error code, rendered as is to clients."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def _subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


def _version_not_found(version: int | None) -> RegistryError:
    return RegistryError(404, 40402, f"Version {-1 if version is None else version} not found.")


def invalid_schema(detail: str) -> RegistryError:
    """The 42201 error: the schema (or its type, or its references) cannot be accepted."""
    return RegistryError(422, 42201, f"Invalid schema: {detail}")


@dataclass(frozen=True)
class Avro:
    """A parsed schema with the fingerprint that decides its id."""

    parsed: avro.schema.Schema
    fingerprint: str


@dataclass(frozen=True)
class Registered:
    """One version of a subject, as GET /subjects/{s}/versions/{v} describes it."""

    subject: str
    version: int
    id: int
    schema: str


def parse_avro(text: str) -> Avro:
    """Parse a schema sent by a client, or refuse it with 42201.

    The fingerprint hashes Avro's own JSON rendering with sorted keys: spacing,
    key order and namespace spelling do not change it, while defaults, docs and
    aliases (which the Parsing Canonical Form drops) do, since they change how
    data is read.
    """
    if not text.strip():
        raise invalid_schema("the request has no schema string")
    try:
        parsed = parse_schema(text)
    except Exception as err:  # avro raises assorted types on malformed input
        raise invalid_schema(str(err) or type(err).__name__) from err
    normal = json.dumps(parsed.to_json(), sort_keys=True, separators=(",", ":"))
    return Avro(parsed, hashlib.sha256(normal.encode()).hexdigest())


@functools.lru_cache(maxsize=1024)
def _stored(text: str) -> avro.schema.Schema:
    """Parse a stored schema once: stored texts never change and were valid when stored."""
    return parse_schema(text)


def parse_version(text: str) -> int | None:
    """Read a version path segment like Confluent: ``latest`` or -1 give None, else 1..2^31-1."""
    value = text.strip()
    if value.lower() == "latest":
        return None
    try:
        version = int(value)
    except ValueError:
        version = 0
    if version == -1:
        return None
    if not 1 <= version <= _MAX_VERSION:
        raise RegistryError(
            422,
            42202,
            f"The specified version '{text}' is not a valid version id. "
            'Allowed values are between [1, 2^31-1] and the string "latest"',
        )
    return version


def parse_level(value: object) -> CompatibilityLevel:
    """Read a compatibility level case-insensitively, or refuse it with 42203."""
    try:
        return CompatibilityLevel(str(value).upper())
    except ValueError:
        raise RegistryError(
            422,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, "
            "backward_transitive, forward_transitive, and full_transitive",
        ) from None


def _verdict(reasons: list[str], level: CompatibilityLevel) -> list[str]:
    """Close a non-empty list of reasons with the level, as Confluent's messages do."""
    return [*reasons, f"{{compatibility: '{level}'}}"] if reasons else []


class SchemaStore:
    """Subjects, versions, schemas and compatibility levels, on one connection pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- registration and lookup ------------------------------------------------

    def register(self, subject: str, text: str) -> int:
        """Register ``text`` under ``subject`` and return its id.

        A schema already live under the subject keeps its version and id; a
        schema known under another subject keeps its id; anything else must pass
        the subject's compatibility level against its live versions (409).
        """
        new = parse_avro(text)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
            rows = conn.execute(
                "SELECT v.version, v.schema_id, v.deleted, s.schema_text"
                " FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id"
                " WHERE v.subject = %s ORDER BY v.version",
                (subject,),
            ).fetchall()
            found = conn.execute(
                "SELECT id FROM registry_schemas WHERE fingerprint = %s", (new.fingerprint,)
            ).fetchone()
            schema_id: int | None = found[0] if found else None
            live = [row for row in rows if not row[2]]
            if any(row[1] == schema_id for row in live):
                assert schema_id is not None
                return schema_id
            level = self._level(conn, subject)
            reasons = incompatibilities(new.parsed, [_stored(row[3]) for row in live], level)
            if reasons:
                details = ", ".join(_verdict(reasons, level))
                raise RegistryError(
                    409,
                    409,
                    "Schema being registered is incompatible with an earlier schema for "
                    f'subject "{subject}", details: [{details}]',
                )
            if schema_id is None:
                inserted = conn.execute(
                    "INSERT INTO registry_schemas (fingerprint, schema_text)"
                    " VALUES (%s, %s) RETURNING id",
                    (new.fingerprint, text),
                ).fetchone()
                assert inserted is not None
                schema_id = int(inserted[0])
            # Like Confluent, re-registering a soft-deleted schema drops the old
            # deleted versions that carried the same id.
            conn.execute(
                "DELETE FROM registry_subject_versions"
                " WHERE subject = %s AND schema_id = %s AND deleted",
                (subject, schema_id),
            )
            version = max((row[0] for row in rows), default=0) + 1
            conn.execute(
                "INSERT INTO registry_subject_versions (subject, version, schema_id)"
                " VALUES (%s, %s, %s)",
                (subject, version, schema_id),
            )
            return schema_id

    def lookup(self, subject: str, text: str, *, deleted: bool = False) -> Registered:
        """Find the version of ``subject`` holding ``text`` (40401 no subject, 40403 no match)."""
        new = parse_avro(text)
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT v.version, s.id, s.schema_text"
                " FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id"
                " WHERE v.subject = %s AND s.fingerprint = %s AND (%s OR NOT v.deleted)"
                " ORDER BY v.deleted, v.version DESC LIMIT 1",
                (subject, new.fingerprint, deleted),
            ).fetchone()
            if row is None:
                if self._has_versions(conn, subject, deleted=deleted):
                    raise RegistryError(404, 40403, "Schema not found")
                raise _subject_not_found(subject)
            return Registered(subject, row[0], row[1], row[2])

    # -- reading ----------------------------------------------------------------

    def subjects(self, *, deleted: bool = False, deleted_only: bool = False) -> list[str]:
        """Subjects with a live version; with ``deleted`` also soft-deleted ones."""
        where = "deleted" if deleted_only else "true" if deleted else "NOT deleted"
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT DISTINCT subject FROM registry_subject_versions WHERE {where}"
                " ORDER BY subject"
            ).fetchall()
        return [row[0] for row in rows]

    def versions(
        self, subject: str, *, deleted: bool = False, deleted_only: bool = False
    ) -> list[int]:
        """The version numbers of ``subject``, oldest first (40401 when it has none)."""
        where = "deleted" if deleted_only else "true" if deleted else "NOT deleted"
        with self._pool.connection() as conn:
            if not self._has_versions(conn, subject, deleted=deleted or deleted_only):
                raise _subject_not_found(subject)
            rows = conn.execute(
                "SELECT version FROM registry_subject_versions"
                f" WHERE subject = %s AND {where} ORDER BY version",
                (subject,),
            ).fetchall()
        return [row[0] for row in rows]

    def version(self, subject: str, version: int | None, *, deleted: bool = False) -> Registered:
        """One version (None: the latest live one); 40401 or 40402 when missing."""
        with self._pool.connection() as conn:
            row = self._row(conn, subject, version, deleted=deleted)
            if row is None:
                if self._has_versions(conn, subject, deleted=deleted):
                    raise _version_not_found(version)
                raise _subject_not_found(subject)
            return Registered(subject, row[0], row[1], row[3])

    def schema(self, schema_id: int) -> str:
        """The text of schema ``schema_id`` as first registered.

        Like Confluent, an id disappears once every version using it has been
        permanently deleted (40403).
        """
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT schema_text FROM registry_schemas s WHERE id = %s AND EXISTS"
                " (SELECT 1 FROM registry_subject_versions v WHERE v.schema_id = s.id)",
                (schema_id,),
            ).fetchone()
        if row is None:
            raise RegistryError(404, 40403, f"Schema {schema_id} not found")
        return str(row[0])

    def uses(self, schema_id: int, *, deleted: bool = False) -> list[tuple[str, int]]:
        """The (subject, version) pairs holding schema ``schema_id`` (40403 if none ever)."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT subject, version, deleted FROM registry_subject_versions"
                " WHERE schema_id = %s ORDER BY subject, version",
                (schema_id,),
            ).fetchall()
        if not rows:
            raise RegistryError(404, 40403, "Schema not found")
        return [(row[0], row[1]) for row in rows if deleted or not row[2]]

    # -- deleting ---------------------------------------------------------------

    def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        """Soft-delete every live version, or (``permanent``) erase a soft-deleted subject.

        Returns:
            The versions deleted, oldest first.
        """
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
            rows = conn.execute(
                "SELECT version, deleted FROM registry_subject_versions"
                " WHERE subject = %s ORDER BY version",
                (subject,),
            ).fetchall()
            if not rows:
                raise _subject_not_found(subject)
            live = [row[0] for row in rows if not row[1]]
            if not permanent:
                if not live:
                    raise RegistryError(
                        404,
                        40404,
                        f"Subject '{subject}' was soft deleted. "
                        "Set permanent=true to delete permanently",
                    )
                conn.execute(
                    "UPDATE registry_subject_versions SET deleted = true"
                    " WHERE subject = %s AND NOT deleted",
                    (subject,),
                )
                return live
            if live:
                raise RegistryError(
                    404,
                    40405,
                    f"Subject '{subject}' was not deleted first before being permanently deleted",
                )
            conn.execute("DELETE FROM registry_subject_versions WHERE subject = %s", (subject,))
            conn.execute("DELETE FROM registry_config WHERE subject = %s", (subject,))
            return [row[0] for row in rows]

    def delete_version(self, subject: str, version: int | None, *, permanent: bool = False) -> int:
        """Soft-delete one version, or (``permanent``) erase a soft-deleted one; returns it."""
        shown = "latest" if version is None else str(version)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
            row = self._row(conn, subject, version, deleted=True)
            if row is not None and row[2] and not permanent:
                raise RegistryError(
                    404,
                    40406,
                    f"Subject '{subject}' Version {shown} was soft deleted. "
                    "Set permanent=true to delete permanently",
                )
            if row is None:
                if self._has_versions(conn, subject, deleted=True):
                    raise _version_not_found(version)
                raise _subject_not_found(subject)
            if permanent and not row[2]:
                raise RegistryError(
                    404,
                    40407,
                    f"Subject '{subject}' Version {row[0]} was not deleted first "
                    "before being permanently deleted",
                )
            key = (subject, row[0])
            if not permanent:
                conn.execute(
                    "UPDATE registry_subject_versions SET deleted = true"
                    " WHERE subject = %s AND version = %s",
                    key,
                )
            else:
                conn.execute(
                    "DELETE FROM registry_subject_versions WHERE subject = %s AND version = %s",
                    key,
                )
                if not self._has_versions(conn, subject, deleted=True):
                    conn.execute("DELETE FROM registry_config WHERE subject = %s", (subject,))
            return int(row[0])

    # -- compatibility ----------------------------------------------------------

    def check(self, subject: str, text: str, version: int | None) -> list[str]:
        """Why ``text`` may not follow ``version`` of ``subject`` (None: the latest live one).

        As in Confluent, that one version is checked alone whatever the level,
        and a subject with no live version accepts anything. An empty list
        means compatible.
        """
        new = parse_avro(text)
        with self._pool.connection() as conn:
            level = self._level(conn, subject)
            row = self._row(conn, subject, version, deleted=False)
        if row is None and version is not None:
            raise _version_not_found(version)
        previous = [] if row is None else [_stored(row[3])]
        return _verdict(incompatibilities(new.parsed, previous, level), level)

    def check_all(self, subject: str, text: str) -> list[str]:
        """Why registering ``text`` under ``subject`` would fail its level (empty: it would not)."""
        new = parse_avro(text)
        with self._pool.connection() as conn:
            level = self._level(conn, subject)
            rows = conn.execute(
                "SELECT s.schema_text FROM registry_subject_versions v"
                " JOIN registry_schemas s ON s.id = v.schema_id"
                " WHERE v.subject = %s AND NOT v.deleted ORDER BY v.version",
                (subject,),
            ).fetchall()
        previous = [_stored(row[0]) for row in rows]
        return _verdict(incompatibilities(new.parsed, previous, level), level)

    # -- configuration ----------------------------------------------------------

    def level(self, subject: str | None = None, *, default_to_global: bool = False) -> str:
        """The level set for ``subject`` (None: global); 40408 when unset and not defaulting."""
        with self._pool.connection() as conn:
            if subject is None or default_to_global:
                return self._level(conn, subject or _GLOBAL)
            row = conn.execute(
                "SELECT compatibility FROM registry_config WHERE subject = %s", (subject,)
            ).fetchone()
        if row is None:
            raise RegistryError(
                404,
                40408,
                f"Subject '{subject}' does not have subject-level compatibility configured",
            )
        return str(row[0])

    def set_level(self, subject: str | None, level: CompatibilityLevel) -> None:
        """Set the level of ``subject`` (None: the global level)."""
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO registry_config (subject, compatibility) VALUES (%s, %s)"
                " ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
                (subject or _GLOBAL, str(level)),
            )

    def delete_level(self, subject: str | None) -> str:
        """Forget the level of ``subject`` (None: reset the global level); returns the old one.

        A subject without its own level gives 40401, as in Confluent.
        """
        with self._pool.connection() as conn:
            old = self._level(conn, _GLOBAL) if subject is None else None
            row = conn.execute(
                "DELETE FROM registry_config WHERE subject = %s RETURNING compatibility",
                (subject or _GLOBAL,),
            ).fetchone()
        if old is not None:
            return old
        if row is None:
            raise _subject_not_found(str(subject))
        return str(row[0])

    # -- shared queries ---------------------------------------------------------

    @staticmethod
    def _level(conn: psycopg.Connection[tuple[Any, ...]], subject: str) -> CompatibilityLevel:
        """The level in force for ``subject``: its own, else the global one, else BACKWARD."""
        row = conn.execute(
            "SELECT compatibility FROM registry_config WHERE subject IN (%s, %s)"
            " ORDER BY subject = %s LIMIT 1",
            (subject, _GLOBAL, _GLOBAL),
        ).fetchone()
        return DEFAULT_LEVEL if row is None else CompatibilityLevel(row[0])

    @staticmethod
    def _has_versions(
        conn: psycopg.Connection[tuple[Any, ...]], subject: str, *, deleted: bool
    ) -> bool:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM registry_subject_versions"
            " WHERE subject = %s AND (%s OR NOT deleted))",
            (subject, deleted),
        ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _row(
        conn: psycopg.Connection[tuple[Any, ...]],
        subject: str,
        version: int | None,
        *,
        deleted: bool,
    ) -> Sequence[Any] | None:
        """(version, id, deleted, text) of one version; None picks the latest live one."""
        query = (
            "SELECT v.version, v.schema_id, v.deleted, s.schema_text"
            " FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id"
            " WHERE v.subject = %s"
        )
        if version is None:
            return conn.execute(
                query + " AND NOT v.deleted ORDER BY v.version DESC LIMIT 1", (subject,)
            ).fetchone()
        return conn.execute(
            query + " AND v.version = %s AND (%s OR NOT v.deleted)", (subject, version, deleted)
        ).fetchone()
