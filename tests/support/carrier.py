"""The carrier stand-in (``python -m services.carrier_sim``) as a real server process.

Used by the carrier's own tests and by every test whose world books with a carrier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.stack import ROOT, free_port


class CarrierProcess:
    """``python -m services.carrier_sim`` on a free loopback port, logging to a file."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CARRIER_")},
            "CARRIER_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CarrierProcess:
        """Start it and wait until it answers."""
        return self.launch().ready()

    def launch(self) -> CarrierProcess:
        """Start the process without waiting for it (``ready`` waits)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.carrier_sim"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def ready(self) -> CarrierProcess:
        """Wait until the launched process answers ``/healthz``."""
        assert self.process is not None, "launch() it first"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"carrier exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"carrier did not become healthy:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
