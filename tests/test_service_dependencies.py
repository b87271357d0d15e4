"""A handler asks for what it needs by type; the service makes it once and closes it on stop.

These drive ``Service`` directly (what the runtime's worker calls per event);
dispatch's pool and carrier client are provided this way, and its tests and
the workflow's run them on the real stack.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from opsflow.errors import ConfigurationError
from opsflow.runtime import Service
from services.contracts import ORDERS, POLICY_CHECK, OrderReceived, PolicyChecked
from tests.support.samples import sample


class Pool:
    """Stands for a connection pool: counts what was opened and closed."""

    opened = 0
    closed = 0

    def __init__(self) -> None:
        Pool.opened += 1
        self.loop = asyncio.get_running_loop()


class Settings:
    def __init__(self, rules_version: str) -> None:
        self.rules_version = rules_version


def _service() -> Service:
    service = Service("deps", consumes=[ORDERS], produces=[POLICY_CHECK])

    @service.dependency
    async def pool() -> AsyncIterator[Pool]:
        await asyncio.sleep(0.01)  # handlers arriving meanwhile wait for this one
        made = Pool()
        try:
            yield made
        finally:
            Pool.closed += 1

    @service.dependency
    def settings() -> Settings:
        return Settings("v7")

    @service.handler
    async def check(order: OrderReceived, pool: Pool, settings: Settings) -> None:
        assert pool.loop is asyncio.get_running_loop()
        SEEN.append((id(pool), settings.rules_version))

    return service


# What the handlers were given: (the pool's id, the rules version).
SEEN: list[tuple[int, str]] = []


def test_a_dependency_is_made_once_on_first_use_and_closed_when_the_service_stops() -> None:
    Pool.opened = Pool.closed = 0
    service = _service()
    service.check_dependencies()
    order = sample("order.received")

    async def run() -> None:
        SEEN.clear()
        await asyncio.gather(*(service.handle_async(order) for _ in range(5)))
        await service.stop_async()

    asyncio.run(run())
    assert len(SEEN) == 5 and len(set(SEEN)) == 1 and SEEN[0][1] == "v7"
    assert (Pool.opened, Pool.closed) == (1, 1)
    # Run again (a new worker in the same process): made afresh on the new loop.
    asyncio.run(run())
    assert len(set(SEEN)) == 1
    assert (Pool.opened, Pool.closed) == (2, 2)


def test_a_plain_handler_gets_plain_dependencies_and_generators_close_on_stop() -> None:
    service = Service("plain", consumes=[ORDERS], produces=[POLICY_CHECK])
    closed: list[str] = []

    @service.dependency
    def version() -> Iterator[Settings]:
        yield Settings("v2")
        closed.append("version")

    @service.handler
    def check(order: OrderReceived, settings: Settings) -> None:
        SEEN.append((0, settings.rules_version))

    service.check_dependencies()
    SEEN.clear()
    assert service.handle(sample("order.received")) == []
    assert SEEN == [(0, "v2")]
    service.stopped()
    assert closed == ["version"]


def test_a_handler_asking_for_what_nothing_provides_stops_the_service_at_start() -> None:
    service = Service("missing", consumes=[ORDERS, POLICY_CHECK], produces=[POLICY_CHECK])

    @service.handler
    async def check(order: OrderReceived, pool: Pool) -> None:
        return None

    @service.handler
    async def sized(order: PolicyChecked, limit: int | None) -> None:
        return None

    with pytest.raises(ConfigurationError) as refused:
        service.check_dependencies()
    assert "check(pool)" in str(refused.value) and "no dependency provides" in str(refused.value)
    del service.handlers["order.received"]
    with pytest.raises(ConfigurationError, match=r"sized\(limit\): asks for int \| None"):
        service.check_dependencies()


def test_a_plain_handler_cannot_ask_for_an_async_dependency() -> None:
    service = Service("mixed", consumes=[ORDERS], produces=[POLICY_CHECK])

    @service.dependency
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()

    @service.handler
    def check(order: OrderReceived, pool: Pool) -> None:
        return None

    with pytest.raises(ConfigurationError, match="is plain but"):
        service.check_dependencies()


def test_a_dependency_must_say_what_it_provides_and_provide_it_once() -> None:
    service = Service("bad", consumes=[ORDERS], produces=[POLICY_CHECK])
    with pytest.raises(TypeError, match="return hint"):

        @service.dependency
        def unhinted():  # type: ignore[no-untyped-def]
            return 1

    @service.dependency
    def settings() -> Settings:
        return Settings("v1")

    with pytest.raises(TypeError, match="already has a dependency"):

        @service.dependency
        def again() -> Settings:
            return Settings("v2")
