"""``python -m services.pod_capture``: serve the proof-of-delivery webhook until stopped.

Settings come from the environment (``services.pod_capture.config`` and the
shared ``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``,
``OPSFLOW_TOPIC_PREFIX``). The settings, the database and the broker are
checked before the server starts (``opsflow.web.server``): a bad one ends the
process with one line on stderr and exit status 2.

The dispatched bookings the webhook matches against are kept by the runtime
service, a second process: ``opsflow run services.pod_capture``.
"""

from __future__ import annotations

import sys

from opsflow.web import server
from services.pod_capture.app import create_app
from services.pod_capture.config import PodSettings


def main() -> int:
    """Check the settings, the database and the broker, then serve until stopped."""
    return server.main("pod-capture", PodSettings, create_app)


if __name__ == "__main__":
    sys.exit(main())
