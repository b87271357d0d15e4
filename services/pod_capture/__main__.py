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

from opsflow import logs
from opsflow.errors import ConfigurationError
from opsflow.web.server import load_settings, serve
from services.pod_capture.app import create_app
from services.pod_capture.config import PodSettings

SERVICE = "pod-capture"


def main() -> int:
    """Check the settings, the database and the broker, then serve until stopped."""
    logs.configure(SERVICE)
    try:
        settings = load_settings(PodSettings)
    except ConfigurationError as err:
        print(f"{SERVICE}: {err}", file=sys.stderr)
        return 2
    return serve(
        SERVICE,
        settings,
        lambda pool, producer: create_app(settings, pool=pool, producer=producer),
    )


if __name__ == "__main__":
    sys.exit(main())
