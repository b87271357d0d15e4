"""The schema evolution gate, run in CI before a new schema version can be published.

The topics keep every record forever and read models are rebuilt by replaying
them, so the newest schema of an event type must read every record ever written
with any older version: each ``vN`` must be compatible with all of ``v1..vN-1``
at ``BACKWARD_TRANSITIVE``. The rules themselves are Apache Avro's, applied by
``opsflow.compatibility``; this module only walks the published versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import avro.errors
import avro.schema

from opsflow.compatibility import CompatibilityLevel, incompatibilities, parse_schema
from opsflow.contracts.catalogue import read_versions, record_full_name, schemas_dir
from opsflow.errors import BadInputError

if TYPE_CHECKING:
    from opsflow.application import Application

REPLAY_LEVEL = CompatibilityLevel.BACKWARD_TRANSITIVE
"""The level the topics' role as replay source demands."""


def _pairs(
    earlier: list[avro.schema.Schema], level: CompatibilityLevel
) -> list[tuple[int, avro.schema.Schema]]:
    """The earlier versions (numbered) a new one is judged against: all of them at a
    transitive level, else the last. Judging each pair on its own, rather than the
    whole history in one call, lets a problem name the version it breaks."""
    numbered = list(enumerate(earlier, start=1))
    return numbered if level.name.endswith("TRANSITIVE") else numbered[-1:]


def _event_problems(directory: Path, event_type: str, level: CompatibilityLevel) -> list[str]:
    try:
        versions = read_versions(directory, event_type)
    except BadInputError as err:
        return [str(err)]
    problems: list[str] = []
    parsed: list[avro.schema.Schema] = []
    first_name = record_full_name(versions[1])
    for number, schema in versions.items():
        where = f"{event_type} v{number}"
        try:
            current = parse_schema(schema)
        except avro.errors.AvroException as err:
            problems.append(f"{where}: not a valid Avro schema: {err}")
            return problems  # later versions cannot be checked against a broken one
        name = record_full_name(schema)
        if name != first_name:
            problems.append(
                f"{where}: record renamed from {first_name} to {name}, "
                "which would move the event type to a new registry subject"
            )
        for earlier, old in _pairs(parsed, level):
            problems += [
                f"{where} (against v{earlier}): {reason}"
                for reason in incompatibilities(current, [old], level)
            ]
        parsed.append(current)
    return problems


def check_evolution(
    directory: Path | None = None,
    level: CompatibilityLevel = REPLAY_LEVEL,
    *,
    application: Application | None = None,
) -> list[str]:
    """Check every published version of every event type against the earlier ones ``level`` names.

    Args:
        directory: the schemas directory (default: ``schemas_dir()``).
        application: whose event types to expect there (default: the one in use).
        level: the compatibility level to enforce; the replay guarantee needs the default.

    Returns:
        One line per problem, starting with ``<event type> v<N>`` (and, for an
        incompatibility, the earlier version it breaks); empty when the schemas may be
        published.

    Raises:
        BadInputError: ``directory`` does not exist.
        ConfigurationError: no directory was given and the default one does not exist.
    """
    if application is None:
        from opsflow.application import load_application  # it imports the contracts

        application = load_application()
    if application.parts and directory is None:
        return [
            p for part in application.parts for p in check_evolution(None, level, application=part)
        ]
    directory = directory if directory is not None else schemas_dir(application)
    if not directory.is_dir():
        raise BadInputError(f"{directory}: no such schemas directory")
    problems = [
        f"{path.name}: schema directory of an event type the application "
        f"{application.name!r} does not declare"
        for path in sorted(directory.iterdir())
        if path.is_dir() and path.name not in application.models
    ]
    for event_type in application.models:
        problems += _event_problems(directory, event_type, level)
    return problems
