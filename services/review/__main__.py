"""``python -m services.review``: serve the review API, open tasks and run the timers.

One process hosts the HTTP API and, in threads, the runtime worker that opens
tasks, the reader of the review topic and the timers (``opsflow.nodes.human``).
Settings come from ``REVIEW_*`` variables and the shared ``KAFKA_BOOTSTRAP_SERVERS``,
``SCHEMA_REGISTRY_URL``, ``DATABASE_URL``, ``OPSFLOW_TOPIC_PREFIX``; they, the SLA
file, the database and the broker are checked before the server starts: a bad
one ends the process with one line on stderr and exit status 2.

Run as many instances as the load needs: they share the tasks (``opsflow.nodes.human``).
"""

from __future__ import annotations

import sys

from opsflow.nodes.human import serve
from services.review.human_task import REVIEW

if __name__ == "__main__":
    sys.exit(serve(REVIEW))
