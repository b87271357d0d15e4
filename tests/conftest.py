"""Fixtures: one real stack for the whole session, and a fresh namespace per test.

The session stack is started with the real command (`opsflow up --detach`) in
a temporary data directory. It honours KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL
and SCHEMA_REGISTRY_URL when they are set, so the same suite runs against
production counterparts (e.g. DATABASE_URL at a local PostgreSQL server);
otherwise it runs against the embedded broker, PostgreSQL and registry.
Tests keep out of each other's way with their own topics, subjects, consumer
groups and database schemas. The inbox's browser tests share Debian's chromium
(``chromium``, once per module).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from opsflow.testing import Cluster
from tests.support.stack import Stack, create_schema, drop_schema

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")

# Both applications are installed; the suite's tests are about the reference one
# unless they say otherwise (test_refunds.py, the combination's tests).
os.environ.setdefault("OPSFLOW_APP", "orders")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The session's stack; with workers (``make test`` runs two, pytest-xdist), one per
    worker: a test may restart the stack's PostgreSQL (test_projections.py), which
    must not happen under another worker's tests."""
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


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless, for the inbox's browser tests; never a browser
    playwright downloads itself (imported here: most modules need no browser)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package "
            "(apt-get install --no-install-recommends chromium)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()
