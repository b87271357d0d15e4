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

from opsflow.web import server
from services.review.app import create_app
from services.review.config import ReviewSettings
from services.review.sla import load_sla


def main() -> int:
    """Check the settings, the database and the broker, then serve until stopped."""
    return server.main(
        "review", ReviewSettings, create_app, check=lambda settings: load_sla(settings.sla_file)
    )


if __name__ == "__main__":
    sys.exit(main())
