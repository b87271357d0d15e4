"""The projector's threads: one ``ProjectionRunner`` per read model, each at its own position.

A projection that fails outside its batches (its topics not there yet, the
broker or PostgreSQL away at start) is started again after a pause, so one
read model's trouble never stops the others. ``OPSFLOW_PROJECTIONS`` (comma
separated names) limits the process to some of them; by default it runs all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from prometheus_client import Counter

from opsflow.errors import ConfigurationError
from opsflow.projections import Projection
from opsflow.projections.runner import ProjectionRunner
from opsflow.readmodels import projections
from opsflow.runtime.observability import Health, Metrics

log = logging.getLogger("opsflow.projector")

_RESTART_MAX_S = 30.0


def selected(names: str | None) -> list[Projection]:
    """The projections named in ``names`` (comma separated; empty or None: all)."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    known = projections()
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigurationError(
            "OPSFLOW_PROJECTIONS",
            f"names unknown projection(s) {', '.join(unknown)}",
            f"Choose from {', '.join(known)}, or unset it to run them all.",
        )
    return [known[n] for n in wanted] if wanted else list(known.values())


class Projector:
    """Runs projections side by side until ``stop()``."""

    def __init__(
        self,
        projections: Sequence[Projection],
        *,
        kafka: Mapping[str, Any],
        registry: SchemaRegistryClient,
        database_url: str,
    ) -> None:
        self.projections = projections
        self.kafka, self.registry, self.database_url = kafka, registry, database_url
        self.metrics = Metrics("projector")
        self.health = Health()
        self.applied = Counter(
            "projection_events_applied",
            "Events applied to a read model",
            ["projection"],
            registry=self.metrics.registry,
            namespace="opsflow",
        )
        self._stop = threading.Event()
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._keep, args=(p,), name=p.name, daemon=True)
            for p in self.projections
        ]
        for thread in threads:
            thread.start()
        while not self._stop.wait(1.0):
            self.health.last_turn = time.monotonic()
        for thread in threads:
            thread.join(30)

    def _keep(self, projection: Projection) -> None:
        """Run one projection, starting it again after a pause if it fails."""
        pause = 1.0
        while not self._stop.is_set():
            runner = ProjectionRunner(
                projection, kafka=self.kafka, registry=self.registry, database_url=self.database_url
            )
            try:
                runner.open()
                self._started(projection.name)
                log.info("projecting", extra={"projection": projection.name})
                pause = 1.0
                counted = 0
                while not self._stop.is_set():
                    runner.step()
                    self.applied.labels(projection.name).inc(runner.applied - counted)
                    counted = runner.applied
            except Exception as err:  # logged, and the projection starts again
                log.error(
                    "projection stopped: starting it again",
                    extra={
                        "projection": projection.name,
                        "error": str(err)[:500],
                        "pause_s": pause,
                    },
                )
                self._stop.wait(pause)
                pause = min(pause * 2, _RESTART_MAX_S)
            finally:
                runner.close()

    def _started(self, name: str) -> None:
        with self._lock:
            self._running.add(name)
            self.health.joined = len(self._running) == len(self.projections)
