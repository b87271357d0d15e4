"""The read models the projector (``shared/opsflow/projector``) keeps current: the
application's own (``Application.read_models``) and the audit log every application has.

Their tables are a contract for the people and programs that read them
(reviewer screens, operators, analytics); ``docs/contracts.md`` documents each
column. Every one can be rebuilt from the topics: ``opsflow projections rebuild NAME``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from opsflow.application import load_application
from opsflow.projections import Projection
from opsflow.readmodels import audit


def projections() -> Mapping[str, Projection]:
    """Every read model by name: the application's, then the audit log."""
    application = load_application()
    found = {p.name: p for p in (*application.read_models, audit.projection(application.topics))}
    return MappingProxyType(found)
