"""``python -m opsflow.runtime MODULE[:ATTR]``: run one service in the foreground."""

import sys

from opsflow.errors import ConfigurationError
from opsflow.runtime import load_service, run

if len(sys.argv) != 2:
    sys.exit("usage: python -m opsflow.runtime MODULE[:ATTRIBUTE]")
try:
    run(load_service(sys.argv[1]))
except ConfigurationError as err:
    sys.exit(f"error: {err}")
