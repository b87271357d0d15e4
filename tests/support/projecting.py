"""The read models' world: one test's topics and schema on the session stack, and the
projector's view of them (counts, states, lag) and the operator CLI pointed at them.

Used by the projection tests and the runbook's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import db
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.projections.status import statuses
from opsflow.projector.service import Projector
from opsflow.readmodels import projections
from opsflow.testing import CommandResult, command, in_thread
from tests.support.histories import publish
from tests.support.stack import Stack


@dataclass
class World:
    prefix: str
    bootstrap: str
    registry_url: str
    database_url: str
    stack: Stack

    @property
    def env(self) -> dict[str, str]:
        return {
            **self.stack.env,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "SCHEMA_REGISTRY_URL": self.registry_url,
            "DATABASE_URL": self.database_url,
            "OPSFLOW_TOPIC_PREFIX": self.prefix,
        }

    @property
    def registry(self) -> SchemaRegistryClient:
        return SchemaRegistryClient({"url": self.registry_url})

    def publish(self, orders: list[list[Event]]) -> int:
        return publish(
            self.bootstrap,
            WireCodec(self.registry),
            [e for h in orders for e in h],
            prefix=self.prefix,
        )

    def cli(self, *args: str) -> CommandResult:
        """``opsflow ARGS`` run in the test process against the world's topics and schema."""
        return command(*args, env=self.env)

    def count(self, table: str) -> int:
        with db.connect(self.database_url) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]

    def states(self) -> dict[str, str]:
        with db.connect(self.database_url) as conn:
            return dict(conn.execute("SELECT order_id, state FROM orders_current").fetchall())

    def wait_caught_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with db.connect(self.database_url, autocommit=True) as conn:
            while True:
                found = statuses(
                    conn, projections().values(), {"bootstrap.servers": self.bootstrap}
                )
                if all(s.lag == 0 for s in found):
                    return
                assert time.monotonic() < deadline, [s.as_json() for s in found]
                time.sleep(0.5)


@contextmanager
def projecting(world: World, *, timeout: float = 60) -> Iterator[Projector]:
    """The projector (every projection) in a thread of this process, on the world's topics
    and schema, until the block ends; the block starts once every projection has opened.
    For tests whose subject is the read models, not the projector's process."""
    projector = Projector(
        list(projections().values()),
        kafka={"bootstrap.servers": world.bootstrap},
        registry=world.registry,
        database_url=world.database_url,
    )
    with in_thread(projector, name="projector", joined_within=timeout):
        yield projector
