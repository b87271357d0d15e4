"""The effect step: one call to an external partner per request, however often it runs.

An effect step is written as two handlers (see the reference application's
dispatch): the first records the intent as an event on the step's own topic
(log before effect), the second reads that request back and calls the partner
through a ``Partner``. The call carries the request's idempotency key as
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
request, which made the calls the larger part of the reference dispatch's CPU
on two cores.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

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
    ``name`` is how refusals name it ("carrier answered 503: ...").

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
