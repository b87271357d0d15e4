"""``python -m opsflow.console``: the operator console (see ``opsflow.console``).

Settings are checked, the database migrated and the broker asked before it
serves (``opsflow.web.server``); it reads the cluster as every operator
command does (``KAFKA_*``, ``SCHEMA_REGISTRY_*``, ``DATABASE_URL``,
``OPSFLOW_TOPIC_PREFIX``).
"""

from __future__ import annotations

import sys

from opsflow.console.app import create_app
from opsflow.console.settings import ConsoleSettings
from opsflow.web import server


def main() -> int:
    return server.main("console", ConsoleSettings, create_app)


if __name__ == "__main__":
    sys.exit(main())
