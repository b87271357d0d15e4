"""Fixtures: one real stack for the whole session, and a fresh namespace per test.

The session stack is started with the real command (`opsflow up --detach`) in
a temporary data directory. It honours KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL
and SCHEMA_REGISTRY_URL when they are set, so the same suite runs against
production counterparts (e.g. DATABASE_URL at a local PostgreSQL server);
otherwise it runs against the embedded broker, PostgreSQL and registry.
Tests keep out of each other's way with their own topics, subjects, consumer
groups and database schemas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from opsflow.testing import Cluster
from tests.support.stack import Stack, create_schema, drop_schema

# Both applications are installed; the suite's tests are about the reference one
# unless they say otherwise (test_refunds.py, the combination's tests).
os.environ.setdefault("OPSFLOW_APP", "orders")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("session-stack")
    env = {**os.environ, "OPSFLOW_DATA_DIR": str(data_dir)}
    # The shared test cluster is throwaway and runs the services with Kafka
    # transactions, which the durable store is not used with (see README, "Known
    # limits"): it uses the memory store. Durability has its own tests
    # (test_stack.py, test_bucket.py, test_tour.py).
    env.setdefault("OPSFLOW_BROKER_STORAGE", "memory")
    # Tests start the services they test themselves, in topics of their own.
    env.setdefault("OPSFLOW_SERVICES", "false")
    session = Stack(data_dir, env)
    session.run("up", "--detach")
    yield session
    session.run("down")


@pytest.fixture(scope="session")
def opsflow_cluster(stack: Stack) -> Cluster:
    """opsflow.testing's cluster is the session's stack (not a second one)."""
    return Cluster(
        stack.address("KAFKA_BOOTSTRAP_SERVERS"),
        stack.address("SCHEMA_REGISTRY_URL"),
        stack.address("DATABASE_URL"),
    )


@pytest.fixture(scope="session")
def registry_url(stack: Stack) -> str:
    return stack.address("SCHEMA_REGISTRY_URL")


@pytest.fixture(scope="session")
def bootstrap_servers(stack: Stack) -> str:
    return stack.address("KAFKA_BOOTSTRAP_SERVERS")


@pytest.fixture
def database_url(stack: Stack) -> Iterator[str]:
    """A URL whose connections work in a fresh, empty schema of the stack's database."""
    base = stack.address("DATABASE_URL")
    schema, url = create_schema(base)
    yield url
    drop_schema(base, schema)
