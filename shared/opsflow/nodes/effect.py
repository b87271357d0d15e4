"""The effect step: one call to an external partner per request, however often it runs.

An effect step is written as two handlers (a payout, a booking): the first
records the intent as an event on the step's own topic (log before effect),
the second reads that request back and calls the partner through a
``Partner``. The call carries the request's idempotency key as
``Idempotency-Key``, so every retry, every re-run after a crash and every replay
asks for the same effect, and a partner honouring the key answers with what it
did the first time: one effect per request even when the step dies between the
partner's answer and its own commit.

``Partner.call`` retries what may go differently next time (a refused or reset
connection, a timeout, 408/409/425/429/5xx) with capped exponential backoff and
jitter, and returns ``Accepted`` (2xx, with the partner's JSON answer) or
``Refused`` (another status: permanent; or the attempts ran out: transient),
which the application turns into its success or failure event: the exception
path an operator works from, never a silent drop. Calls in flight are bounded
by the connection pool (``concurrency``), as the runtime bounds the handlers.

The client is aiohttp's: httpx's pool checks every pooled connection on each
request, which made the calls the larger part of an effect step's CPU on two
cores (measured on the reference application's bookings).

``Claims`` keeps the step to one effect per workflow instance, following the
instance's first decision: a second approval (a duplicate under another key)
causes nothing, a replay of the first is let through with its same key, and
a decision contradicting the first (an approval after a refusal, a refusal
after the effect was requested) changes nothing and is dead-lettered with the
reason (``ContradictingDecisionError``), where the operator sees it.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from opsflow.errors import AwaitingError, ConfigurationError, PermanentError
from opsflow.settings import DatabaseSettings

# What marks an instance's refusal in ``effect_claims.request_key``, before the key of
# the refusing decision.
DECLINED = "declined:"

# Statuses worth asking again: the partner may answer differently next time.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a call is repeated.

    Attributes:
        max_attempts: calls per request before it is given up (``Refused``,
            not permanent).
        backoff_s / backoff_max_s: the first and the largest wait between calls
            (doubling, with +-20% jitter so a burst of retries spreads out).
    """

    max_attempts: int = 5
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th call failed."""
        base = min(self.backoff_max_s, self.backoff_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Accepted:
    """The partner did it (2xx): its JSON answer, and how many calls it took."""

    answer: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class Refused:
    """The partner will not do it (``permanent``), or every attempt failed."""

    reason: str
    permanent: bool
    attempts: int


class Partner:
    """An HTTP endpoint that honours ``Idempotency-Key``, called from one event loop;
    ``name`` is how refusals name it ("payments answered 503: ...").

    Create it on the loop that uses it (a service dependency does) and ``close``
    it there: left open, aiohttp reports "Unclosed client session" at exit.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "partner",
        concurrency: int = 64,
        timeout_s: float = 5.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.retry = retry or Retry()
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def call(self, idempotency_key: str, payload: Mapping[str, Any]) -> Accepted | Refused:
        """POST ``payload`` as JSON under ``idempotency_key``, retried as the class says."""
        reason = "no attempt made"
        body = json.dumps(payload).encode()
        headers = {**self._headers, "Idempotency-Key": idempotency_key}
        attempts = self.retry.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.post(self.url, data=body, headers=headers) as response:
                    status, phrase = response.status, response.reason or ""
                    answer = await response.read()  # read to the end: the connection is reused
            except (aiohttp.ClientError, TimeoutError) as err:  # refused, reset, timed out
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if 200 <= status < 300:
                    decoded = json.loads(answer) if answer else {}
                    return Accepted(decoded if isinstance(decoded, dict) else {}, attempt)
                reason = f"{self.name} answered {status}: {_detail(answer, phrase)}"
                if status not in TRANSIENT_STATUSES:
                    return Refused(reason, permanent=True, attempts=attempt)
            if attempt < attempts:
                await asyncio.sleep(self.retry.delay(attempt))
        return Refused(reason, permanent=False, attempts=attempts)

    async def close(self) -> None:
        await self._session.close()


def _detail(answer: bytes, phrase: str) -> str:
    """What a refusal says, in a line: a problem document's detail or title, else the text."""
    try:
        body = json.loads(answer)
    except ValueError:
        return answer[:200].decode(errors="replace") or phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:500]
    return str(body)[:500]


class ContradictingDecisionError(PermanentError):
    """A decision about a workflow instance that contradicts its first one (approved
    after a refusal, or refused after its effect was requested): the first stands."""


class Claims:
    """One effect per workflow instance and step, after its first decision: the
    ``effect_claims`` table, over a pool opened on the loop that uses it (a service
    dependency makes and closes it).

    The event that triggers an effect (an approval) often lacks what the effect
    needs (an amount, an address), which came with an earlier event of the
    instance: ``remember`` keeps it, ``claim`` hands it over to the one request
    key that may act, ``decline`` records a refusal as the instance's decision.
    Writes are idempotent, so retries and replays change nothing.
    """

    def __init__(self, step: str, database_url: str, *, size: int = 8) -> None:
        self.step = step
        # Autocommit: every write is one statement that stands on its own.
        self._pool = AsyncConnectionPool(
            database_url, min_size=1, max_size=size, open=False, kwargs={"autocommit": True}
        )
        self._opened = False

    @classmethod
    def from_settings(cls, step: str, *, size: int = 8) -> Claims:
        """The step's claims in ``DATABASE_URL``'s database; use it as an async context
        manager in a service dependency, so the pool is closed on the loop that
        opened it when the service stops.

        Raises:
            ConfigurationError: ``DATABASE_URL`` is not set.
        """
        url = DatabaseSettings().database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL", "is not set", f"Set it, or run {step} under `opsflow up`."
            )
        return cls(step, url, size=size)

    async def __aenter__(self) -> Claims:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _ready(self) -> AsyncConnectionPool[Any]:
        if not self._opened:
            await self._pool.open()
            self._opened = True
        return self._pool

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    async def remember(self, key: str, details: Mapping[str, Any]) -> None:
        """Keep what instance ``key``'s effect needs (the first remembered wins)."""
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO effect_claims (step, instance_key, details) VALUES (%s, %s, %s)"
                " ON CONFLICT (step, instance_key) DO NOTHING",
                (self.step, key, Jsonb(dict(details))),
            )

    async def claim(
        self, key: str, request_key: str, details: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Claim instance ``key``'s one effect for ``request_key``: what the effect needs
        if granted (nobody decided the instance yet, or this very request key did: a
        retry or a replay); None when another approval claimed it already.

        ``details``: what the effect needs, when the approval carries it (remembered
        and claimed in one statement; what was remembered first still wins).

        Raises:
            AwaitingError: nothing was remembered for the instance yet (its earlier
                event is on another topic, read concurrently): tried again shortly,
                and dead-lettered with this reason if it never comes.
            ContradictingDecisionError: the instance was declined first.
        """
        holder, found = await self._decide(key, request_key, details)
        if holder == request_key:
            return found
        if holder.startswith(DECLINED):
            raise ContradictingDecisionError(
                f"{self.step}: {key} approved after it was declined (by"
                f" {holder.removeprefix(DECLINED)}); the refusal stands, nothing is done"
            )
        return None

    async def decline(self, key: str, decision_key: str) -> None:
        """Record the refusal ``decision_key`` (the refusing event's idempotency key) as
        instance ``key``'s decision, unless it was decided before: a later approval
        then causes nothing. A repeated refusal changes nothing.

        Raises:
            ContradictingDecisionError: the instance's effect was requested first.
        """
        holder, _ = await self._decide(key, DECLINED + decision_key, {})
        if not holder.startswith(DECLINED):
            raise ContradictingDecisionError(
                f"{self.step}: {key} declined after its effect was requested ({holder});"
                " the request stands"
            )

    async def _decide(
        self, key: str, decision: str, details: Mapping[str, Any] | None
    ) -> tuple[str, dict[str, Any]]:
        """Make ``decision`` the instance's unless it has one: (its decision, details)."""
        pool = await self._ready()
        params: dict[str, object] = {"step": self.step, "key": key, "decision": decision}
        if details is None:
            take = (
                "UPDATE effect_claims SET request_key = %(decision)s, claimed_at = now()"
                " WHERE step = %(step)s AND instance_key = %(key)s AND request_key IS NULL"
                " RETURNING request_key, details"
            )
        else:
            take = (
                "INSERT INTO effect_claims"
                " (step, instance_key, details, request_key, claimed_at)"
                " VALUES (%(step)s, %(key)s, %(details)s, %(decision)s, now())"
                " ON CONFLICT (step, instance_key) DO UPDATE"
                " SET request_key = EXCLUDED.request_key, claimed_at = EXCLUDED.claimed_at"
                " WHERE effect_claims.request_key IS NULL"
                " RETURNING request_key, details"
            )
            params["details"] = Jsonb(dict(details))
        async with pool.connection() as conn:
            row: Any = await (await conn.execute(take, params)).fetchone()
            if row is None:
                row = await (
                    await conn.execute(
                        "SELECT request_key, details FROM effect_claims"
                        " WHERE step = %s AND instance_key = %s",
                        (self.step, key),
                    )
                ).fetchone()
        if row is None:
            raise AwaitingError(f"{self.step}: {key} triggered before its earlier event was seen")
        return row[0], dict(row[1])
