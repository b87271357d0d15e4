"""Who may emit an event type: the declaration every consumer checks before acting.

An event's envelope names its ``producer``: the service that wrote it, or, for
events that come from outside (through ingest or the producer SDK), the
producer an API key was issued to. Each event class declares who may emit it
(``emitted_by``), so that a key for a shop cannot approve an order, book a
carrier or fake a delivery:

    class OrderReceived(Event):
        emitted_by: ClassVar[Emitters] = Emitters(external=ANY_PRODUCER)

    class PolicyChecked(Event):
        emitted_by: ClassVar[Emitters] = Emitters(services={"policy-check"})

Three places enforce it: ingest and the SDK's HTTP surfaces refuse a key whose
producer (and scope) does not cover the event type (403); every consumer
dead-letters a record whose envelope names a producer the declaration does not
allow, with the reason; ``opsflow acls`` prints the Kafka ACLs that enforce the
same at the broker, where a forged envelope cannot get past the principal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opsflow.errors import BadInputError


class _AnyProducer:
    """Any external producer whose API key is scoped to the event type."""

    def __repr__(self) -> str:
        return "ANY_PRODUCER"


ANY_PRODUCER = _AnyProducer()


@dataclass(frozen=True, init=False)
class Emitters:
    """Who may write an event type.

    Attributes:
        services: the application's services (their ``Service`` or program
            names) that write it.
        external: the external producers (API keys' producer names) that may
            send it, or ``ANY_PRODUCER`` for any producer with a key.
    """

    services: frozenset[str]
    external: frozenset[str] | _AnyProducer

    def __init__(
        self, *, services: Iterable[str] = (), external: Iterable[str] | _AnyProducer = ()
    ) -> None:
        object.__setattr__(self, "services", frozenset(services))
        object.__setattr__(
            self,
            "external",
            external if isinstance(external, _AnyProducer) else frozenset(external),
        )

    def admits_external(self, producer: str) -> bool:
        """Whether an API key issued to ``producer`` may send this event type."""
        return isinstance(self.external, _AnyProducer) or producer in self.external

    def allows(self, producer: str, services: frozenset[str]) -> bool:
        """Whether a record whose envelope names ``producer`` may be acted on.

        ``services``: every service of the application. A service's name is not
        an external producer's (keys cannot be issued to one), so a record
        claiming to come from a service that does not write the type is refused
        even where any external producer may send it.
        """
        if producer in self.services:
            return True
        return producer not in services and self.admits_external(producer)

    @property
    def example(self) -> str:
        """A producer the declaration allows, for test kits and fixtures that play the
        writer of an event (a service's name first; ``tests`` for any producer)."""
        if self.services:
            return min(self.services)
        if isinstance(self.external, frozenset) and self.external:
            return min(self.external)
        return "tests"

    def describe(self) -> str:
        """Who may emit, in words, for errors and the contract reference."""
        parts = [f"service {name}" for name in sorted(self.services)]
        if isinstance(self.external, _AnyProducer):
            parts.append("any external producer (not a service)")
        else:
            parts.extend(f"producer {name}" for name in sorted(self.external))
        return ", ".join(parts) or "nobody"


class ForbiddenProducerError(BadInputError):
    """A record whose envelope names a producer not allowed to emit its event type."""

    def __init__(self, event_type: str, producer: str, emitters: Emitters) -> None:
        self.event_type = event_type
        self.producer = producer
        super().__init__(
            f"{event_type} written by producer {producer!r}, which may not emit it"
            f" (allowed: {emitters.describe()}); not acted on"
        )
