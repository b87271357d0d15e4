"""``python -m services.review``: serve the review API, open tasks and run the timers.

One process hosts the HTTP API and, in threads, the runtime worker that opens
tasks, the reader of the review topic and the timers (``services.review.feed``).
Settings come from the environment (``services.review.config`` and the shared
``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``,
``OPSFLOW_TOPIC_PREFIX``). The settings, the SLA file, the database and the
broker are checked before the server starts (``opsflow.web.server``): a bad
one ends the process with one line on stderr and exit status 2.

Run one instance per deployment (see ``services.review``).
"""

from __future__ import annotations

import sys

from opsflow import logs
from opsflow.errors import ConfigurationError
from opsflow.web.server import load_settings, serve
from services.review.app import create_app
from services.review.config import ReviewSettings
from services.review.sla import load_sla

SERVICE = "review"


def main() -> int:
    """Check the settings and the SLA file, then serve until stopped."""
    logs.configure(SERVICE)
    try:
        settings = load_settings(ReviewSettings)
        load_sla(settings.sla_file)
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
