"""The SLA table (``sla.yaml``): how long a task may wait in each tier.

Loaded once per process; the due times it yields are written into the events,
so a change of the file never moves the deadline of a task already open.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from opsflow.errors import ConfigurationError


@dataclass(frozen=True)
class SlaPolicy:
    """Reviewer SLA per reason code (the default for unlisted codes) and the supervisor SLA."""

    reviewer: timedelta
    supervisor: timedelta
    by_reason: Mapping[str, timedelta]

    def reviewer_sla(self, reason_codes: Iterable[str]) -> timedelta:
        """The shortest SLA among ``reason_codes`` that have one, else the default: the most
        urgent reason sets the pace."""
        listed = [self.by_reason[code] for code in reason_codes if code in self.by_reason]
        return min(listed, default=self.reviewer)


def _minutes(data: Mapping[str, Any], key: str, where: Path) -> timedelta:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(
            "REVIEW_SLA_FILE", f"{where}: {key} must be a positive number of minutes", "Fix it"
        )
    return timedelta(minutes=value)


@cache
def load_sla(path: Path) -> SlaPolicy:
    """The SLA table in ``path``.

    Raises:
        ConfigurationError: the file is missing, not YAML, or a value is not a
            positive number of minutes.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigurationError(
            "REVIEW_SLA_FILE", f"cannot read {path} ({err})", "Fix it"
        ) from err
    if not isinstance(data, dict):
        raise ConfigurationError("REVIEW_SLA_FILE", f"{path} is not a mapping", "Fix it")
    reasons = data.get("reasons") or {}
    if not isinstance(reasons, dict):
        raise ConfigurationError("REVIEW_SLA_FILE", f"{path}: reasons is not a mapping", "Fix it")
    return SlaPolicy(
        reviewer=_minutes(data, "reviewer_minutes", path),
        supervisor=_minutes(data, "supervisor_minutes", path),
        by_reason={str(code): _minutes(reasons, code, path) for code in reasons},
    )
