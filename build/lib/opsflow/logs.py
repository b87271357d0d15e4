"""Structured logs: one JSON object per line, with the fields an operator filters on.

Every line carries the service name; the runtime adds correlation_id,
event_id and trace_id where it logs about one event (as ``extra`` fields).
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure(service: str, *, level: str = "INFO") -> None:
    """Send every log record to stdout as JSON, tagged with ``service``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One line per HTTP call to the registry would bury the service's own lines.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
