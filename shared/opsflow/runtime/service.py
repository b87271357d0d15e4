"""The one way to write an opsflow service: declare topics, write typed handlers.

    service = Service("approve", consumes=[INVOICES], produces=[APPROVALS])

    @service.handler
    def approve(invoice: InvoiceSubmitted) -> InvoiceApproved:
        return InvoiceApproved(invoice_id=invoice.invoice_id, ...)  # envelope derived for you

A handler takes one event (its type hint says which: one event class or a
union) and returns the events to emit: one, several (any iterable), or None.
A handler that waits on a partner (an HTTP call) is written ``async def``:
the runtime then runs up to ``concurrency`` inputs of a batch at once (one
order's inputs still one after another) and produces their outputs in order.
What handlers need beyond the event (a connection pool, a partner's HTTP
client, settings) they ask for by type, and the service provides it::

    @service.dependency
    async def payments() -> AsyncIterator[Partner]:
        client = Partner(SETTINGS.payments_url)  # made once, on first use, on the loop
        try:
            yield client
        finally:
            await client.close()                  # when the service stops

    @service.handler
    async def pay(request: PayoutRequested, payments: Partner) -> RefundPaid: ...

A dependency is a function returning the value, or a generator (plain or
``async``) yielding it once and closing it after; ``async`` ones serve
``async def`` handlers. ``@service.on_stop`` registers anything else to run
once the service has stopped consuming.
Decoding, encoding, envelopes, keys, transactions, retries and dead letters
are the runtime's (``opsflow.runtime.worker``).
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
import random
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Union

from opsflow.contracts import Event, Topic
from opsflow.errors import AwaitingError, ConfigurationError, PermanentError

HandlerResult = Event | Iterable[Event] | None
Handler = Callable[..., HandlerResult] | Callable[..., Awaitable[HandlerResult]]
StopHook = Callable[[], None] | Callable[[], Awaitable[None]]
Dependency = Callable[[], Any]
_YIELDING = (
    collections.abc.Iterator,
    collections.abc.Generator,
    collections.abc.AsyncIterator,
    collections.abc.AsyncGenerator,
)


class Delivery(StrEnum):
    """How a service makes each input's outputs appear exactly once.

    ``transactions``: Kafka transactions, one transactional producer per input
    partition; the standard on Apache Kafka and Redpanda.

    ``log-scan``: no transactions; outputs are written by an idempotent
    producer that never gives up on a write, then offsets committed, and after
    any failure or takeover the outputs already written are found in the
    output topics and not written again. A process that stood still fences
    itself before writing again. For brokers whose transactions are too costly
    or unreliable (the embedded broker's durable store, where ``opsflow up``
    sets it). What it guarantees and costs: ``opsflow.runtime.delivery`` and the
    README, "Exactly once".
    """

    TRANSACTIONS = "transactions"
    LOG_SCAN = "log-scan"


@dataclass(frozen=True)
class BatchPolicy:
    """How many inputs one transaction covers: whichever limit is reached first.

    Larger batches amortise the commit round trips; the interval bounds the
    latency an event can wait for its batch to commit. A batch is also
    committed as soon as the consumer has nothing more buffered, so a quiet
    input does not wait for the interval; under load, what arrives during
    one commit makes up the next batch.
    """

    max_events: int = 500
    max_interval_s: float = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: exponential, capped, with jitter.

    ``max_attempts=None`` retries until it works (the partition waits, nothing
    is lost); a number dead-letters the input once it is reached. An input
    awaiting a record not seen yet (``AwaitingError``) is tried at most
    ``max_waits`` times (with the defaults, about 25 s), then dead-lettered.
    """

    initial_s: float = 0.2
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None
    max_waits: int = 8

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number ``attempt + 1`` (attempt counts from 1)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(attempt - 1, 0))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))

    def exhausted(self, attempt: int, err: BaseException) -> bool:
        """Whether ``err``, failing try number ``attempt``, is not to be tried again."""
        if isinstance(err, AwaitingError) and attempt >= self.max_waits:
            return True
        return self.max_attempts is not None and attempt >= self.max_attempts


def _resume(made: collections.abc.Generator[Any, Any, Any]) -> StopHook:
    """The stop hook of a generator dependency: runs what follows its ``yield``."""

    def finish() -> None:
        for _ in made:
            raise RuntimeError("a generator dependency yielded more than once")

    return finish


def _resume_async(made: collections.abc.AsyncGenerator[Any, Any]) -> StopHook:
    async def finish() -> None:
        async for _ in made:
            raise RuntimeError("a generator dependency yielded more than once")

    return finish


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _event_classes(handler: Handler) -> list[type[Event]]:
    hints = typing.get_type_hints(handler)
    params = list(inspect.signature(handler).parameters)
    if not params or params[0] not in hints:
        raise TypeError(f"handler {handler.__qualname__} needs a type hint on its event parameter")
    hint = hints[params[0]]
    origin = typing.get_origin(hint)
    classes = typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)
    if not all(isinstance(c, type) and issubclass(c, Event) for c in classes):
        raise TypeError(f"handler {handler.__qualname__} must take opsflow events, not {hint}")
    return list(classes)


def _needs(handler: Handler) -> dict[str, type]:
    """The handler's parameters after the event, by name, with the type each asks for."""
    hints = typing.get_type_hints(handler)
    needs = {}
    for name in list(inspect.signature(handler).parameters)[1:]:
        if name not in hints:
            raise TypeError(
                f"handler {handler.__qualname__} needs a type hint on {name!r}: the type of "
                "the dependency it asks for"
            )
        needs[name] = hints[name]
    return needs


def _provided(fn: Dependency) -> type:
    """What a dependency provides: its return hint, or what it yields."""
    hint = typing.get_type_hints(fn).get("return")
    if typing.get_origin(hint) in _YIELDING:
        hint = typing.get_args(hint)[0]
    if not isinstance(hint, type):
        raise TypeError(
            f"dependency {fn.__qualname__} needs a return hint naming the class it provides "
            "(or Iterator[...] / AsyncIterator[...] of it)"
        )
    return hint


@dataclass
class Service:
    """A named consumer-transformer-producer with its handlers.

    Args:
        name: the service's name: its consumer group, the ``producer`` of its
            events and part of every idempotency key it derives.
        consumes: topics it reads.
        produces: topics it may write (a handler returning an event for any
            other topic is a bug, and dead-letters the input).
        batch: transaction batching.
        retry: backoff for transient failures.
        concurrency: how many inputs' async handlers may wait at once.

    Dependencies (``@service.dependency``) are made on first use and closed
    when the service stops, so a service run again (a restarted worker in
    the same process) makes them afresh, on its own loop.
    """

    name: str
    consumes: Sequence[Topic]
    produces: Sequence[Topic]
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 64
    handlers: dict[str, Handler] = field(default_factory=dict)
    stop_hooks: list[StopHook] = field(default_factory=list)
    dependencies: dict[type, Dependency] = field(default_factory=dict)
    # Per event type: the handler's parameters after the event, and the type each asks for.
    needs: dict[str, dict[str, type]] = field(default_factory=dict)
    _made: dict[type, Any] = field(default_factory=dict, repr=False)
    _making: dict[type, asyncio.Lock] = field(default_factory=dict, repr=False)

    def handler(self, fn: Handler) -> Handler:
        """Register ``fn`` for the event type(s) named by its first parameter's hint."""
        for cls in _event_classes(fn):
            if cls.topic not in self.consumes:
                raise TypeError(
                    f"{fn.__qualname__} handles {cls.event_type}, which arrives on "
                    f"{cls.topic}, a topic {self.name} does not consume"
                )
            if cls.event_type in self.handlers:
                raise TypeError(f"{cls.event_type} already has a handler in {self.name}")
            self.handlers[cls.event_type] = fn
            self.needs[cls.event_type] = _needs(fn)
        return fn

    def dependency(self, fn: Dependency) -> Dependency:
        """Register ``fn`` as what provides its return type (or what it yields) to the
        handlers that ask for that type by a parameter."""
        provided = _provided(fn)
        if provided in self.dependencies:
            raise TypeError(f"{provided.__qualname__} already has a dependency in {self.name}")
        self.dependencies[provided] = fn
        return fn

    def check_dependencies(self) -> None:
        """Refuse to start with a handler asking for what no dependency provides, or a
        plain handler asking for an ``async`` one (it has no loop to make it on).

        Raises:
            ConfigurationError: naming the handler and the parameter.
        """
        for event_type, fn in self.handlers.items():
            for name, wanted in self.needs[event_type].items():
                maker = self.dependencies.get(wanted)
                if maker is None:
                    asked = getattr(wanted, "__qualname__", repr(wanted))  # a union has none
                    problem = f"asks for {asked}, which no dependency provides"
                elif _is_async(maker) and not inspect.iscoroutinefunction(fn):
                    problem = f"is plain but {maker.__qualname__} is async"
                else:
                    continue
                raise ConfigurationError(
                    f"{self.name}: {fn.__qualname__}({name})",
                    problem,
                    "Register a @service.dependency returning (or yielding) that type.",
                )

    def on_stop(self, fn: StopHook) -> StopHook:
        """Register ``fn`` to run when the service stops, after its last input: where it
        closes what its handlers opened, so the process ends without leaked clients
        (an aiohttp session left open is reported on stderr at exit). ``async def``
        hooks are awaited. Hooks run once, last registered first, each even if one
        before it failed."""
        self.stop_hooks.append(fn)
        return fn

    async def stop_async(self) -> None:
        """Run the stop hooks that have not run yet, on the running loop: the one the
        async handlers ran on, when the caller still has it.

        Raises:
            Exception: the first hook's error, once every hook has run.
        """
        failure: Exception | None = None
        self._made.clear()  # made afresh (on the new loop) if the service runs again
        self._making.clear()
        while self.stop_hooks:
            fn = self.stop_hooks.pop()
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as err:  # the other hooks still run; the first error is raised
                failure = failure or err
        if failure is not None:
            raise failure

    def stopped(self) -> None:
        """Run the stop hooks that have not run yet (see ``on_stop``); the runtime calls
        this once its worker has returned.

        The worker of a service with async handlers runs the hooks on their loop
        before closing it (so clients bound to it close their sockets); this
        runs them for the others, on a loop of its own.
        """
        if self.stop_hooks:
            asyncio.run(self.stop_async())

    @property
    def is_async(self) -> bool:
        """Whether any handler is ``async def`` (the runtime then handles inputs concurrently)."""
        return any(inspect.iscoroutinefunction(fn) for fn in self.handlers.values())

    def handle(self, event: Event) -> list[Event]:
        """Run the (plain) handler for ``event``; none: the event is not for this service."""
        fn = self.handlers.get(event.event_type)
        if fn is None:
            return []
        needs = self.needs[event.event_type]
        if not needs:  # the common case, without building an empty dict per event
            return self._outputs(fn(event))
        given = {name: self._provide(wanted) for name, wanted in needs.items()}
        return self._outputs(fn(event, **given))

    async def handle_async(self, event: Event) -> list[Event]:
        """Run the handler for ``event``, awaiting it if it is ``async def``."""
        fn = self.handlers.get(event.event_type)
        if fn is None:
            return []
        given = {
            name: await self._provide_async(wanted)
            for name, wanted in self.needs[event.event_type].items()
        }
        result = fn(event, **given)
        return self._outputs(await result if inspect.isawaitable(result) else result)

    def _provide(self, wanted: type) -> Any:
        if wanted not in self._made:
            made = self.dependencies[wanted]()
            if inspect.isgenerator(made):
                self.stop_hooks.append(_resume(made))
                made = next(made)
            self._made[wanted] = made
        return self._made[wanted]

    async def _provide_async(self, wanted: type) -> Any:
        if wanted in self._made:
            return self._made[wanted]
        # Handlers waiting at once on the first use make it once.
        async with self._making.setdefault(wanted, asyncio.Lock()):
            if wanted not in self._made:
                made = self.dependencies[wanted]()
                if inspect.isasyncgen(made):
                    self.stop_hooks.append(_resume_async(made))
                    made = await anext(made)
                elif inspect.isgenerator(made):
                    self.stop_hooks.append(_resume(made))
                    made = next(made)
                elif inspect.isawaitable(made):
                    made = await made
                self._made[wanted] = made
        return self._made[wanted]

    def _outputs(self, result: object) -> list[Event]:
        outputs: list[Event] = (
            [] if result is None else [result] if isinstance(result, Event) else list(result)  # type: ignore[call-overload]
        )
        for out in outputs:
            if out.topic not in self.produces:
                raise PermanentError(
                    f"{self.name} emitted {out.event_type} to {out.topic}, "
                    f"which is not among the topics it produces ({', '.join(self.produces)})"
                )
        return outputs
