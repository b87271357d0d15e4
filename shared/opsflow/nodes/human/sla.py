"""A human step's SLA table (its ``sla.yaml``): how long a task may wait in each tier.

The file::

    reviewer_minutes: 120      # the first tier's SLA, unless a reason says otherwise
    supervisor_minutes: 60     # the second tier's, counted from the missed deadline
    reasons:                   # shorter (or longer) first-tier SLAs per reason code;
      CUSTOMER_HIGH_RISK: 60   # the most urgent reason of a task sets its pace

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


def _minutes(data: Mapping[str, Any], key: str, where: Path, variable: str) -> timedelta:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(
            variable, f"{where}: {key} must be a positive number of minutes", "Fix it"
        )
    return timedelta(minutes=value)


@cache
def load_sla(path: Path, variable: str = "SLA_FILE") -> SlaPolicy:
    """The SLA table in ``path`` (``variable`` names the setting that chose it).

    Raises:
        ConfigurationError: the file is missing, not YAML, or a value is not a
            positive number of minutes.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigurationError(variable, f"cannot read {path} ({err})", "Fix it") from err
    if not isinstance(data, dict):
        raise ConfigurationError(variable, f"{path} is not a mapping", "Fix it")
    reasons = data.get("reasons") or {}
    if not isinstance(reasons, dict):
        raise ConfigurationError(variable, f"{path}: reasons is not a mapping", "Fix it")
    return SlaPolicy(
        reviewer=_minutes(data, "reviewer_minutes", path, variable),
        supervisor=_minutes(data, "supervisor_minutes", path, variable),
        by_reason={str(code): _minutes(reasons, code, path, variable) for code in reasons},
    )
