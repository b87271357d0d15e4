"""The proof-of-delivery intake as the stack runs it, for tests that need it running."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.support.stack import free_port, start_service, stop_process


@contextmanager
def pod_capture_running(env: Mapping[str, str], logs: Path, **webhook_env: str) -> Iterator[str]:
    """pod-capture's two processes, each ready: its webhook (``python -m
    services.pod_capture``, with ``webhook_env`` on top of ``env``) and its stream
    service (``opsflow run services.pod_capture``: it has joined its group, so the
    bookings the webhook matches proofs against are being kept). Yields the webhook's
    URL; stops both after."""
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(
            start_service(
                ["-m", "services.pod_capture"],
                {**env, "POD_PORT": str(port), **webhook_env},
                logs / "webhook.log",
                f"{url}/readyz",
            )
        )
        started.append(
            start_service(
                ["-m", "opsflow", "run", "services.pod_capture"],
                {**env, "OPSFLOW_METRICS_PORT": str(metrics_port)},
                logs / "pod-capture.log",
                f"http://127.0.0.1:{metrics_port}/readyz",
            )
        )
        yield url
    finally:
        for proc in started:
            stop_process(proc)
