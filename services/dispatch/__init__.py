"""dispatch: books a carrier for every approved order, exactly once per order.

``opsflow run services.dispatch`` runs it; see ``service`` for how it keeps
its promise under kill -9.
"""

from services.dispatch.service import service

__all__ = ["service"]
