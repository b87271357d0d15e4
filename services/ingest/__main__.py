"""``python -m services.ingest``: serve the ingest API until stopped.

Settings come from the environment (``services.ingest.config`` and the shared
``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``,
``OPSFLOW_TOPIC_PREFIX``). The settings, the database and the broker are
checked before the server starts (``opsflow.web.server``): a bad one ends the
process with one line on stderr and exit status 2, not a traceback from a worker.
"""

from __future__ import annotations

import sys

from opsflow.web import server
from services.ingest.app import create_app
from services.ingest.config import IngestSettings


def main() -> int:
    """Check the settings, the database and the broker, then serve until stopped."""
    return server.main("ingest", IngestSettings, create_app)


if __name__ == "__main__":
    sys.exit(main())
