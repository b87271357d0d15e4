"""A stand-in for the payment partner, served over HTTP on loopback.

``POST /refunds`` with an ``Idempotency-Key`` pays a refund back once: the
same key again answers with the payout already made (200, the same
reference), so a retry, a re-run after a crash or a replay never pays twice.
Currencies in ``PAYMENTS_REFUSED_CURRENCIES`` are refused (422: permanent), and
``PAYMENTS_FAIL_EVERY`` makes every Nth first call answer 503 (transient) to
exercise the caller's retries. Payouts are kept in SQLite (``PAYMENTS_DB``), so
what was paid survives a restart; ``GET /refunds?refund_id=`` lists them.

``python -m services.refunds.payments_sim`` serves it on ``PAYMENTS_PORT``.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import uuid
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PaymentsSettings(BaseSettings):
    """``PAYMENTS_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="PAYMENTS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8720, ge=0, le=65535)
    db: str = ":memory:"
    refused_currencies: str = ""
    fail_every: int = Field(default=0, ge=0)


class RefundBody(BaseModel):
    """What to pay back, to whom."""

    model_config = ConfigDict(extra="forbid")

    refund_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    amount_minor: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class Payout(BaseModel):
    """A payout made."""

    payout_reference: str
    refund_id: str
    amount_minor: int
    currency: str
    idempotency_key: str


class Ledger:
    """Payouts by idempotency key, in SQLite; one writer at a time."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS payouts (idempotency_key TEXT PRIMARY KEY,"
            " payout_reference TEXT NOT NULL, refund_id TEXT NOT NULL,"
            " amount_minor INTEGER NOT NULL, currency TEXT NOT NULL)"
        )
        self._lock = threading.Lock()
        self.calls = 0

    def pay(self, key: str, body: RefundBody) -> tuple[Payout, bool]:
        """The payout under ``key``: the one made before (False), or a new one (True)."""
        with self._lock:
            row = self._db.execute(
                "SELECT payout_reference, refund_id, amount_minor, currency, idempotency_key"
                " FROM payouts WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
            if row is not None:
                return _payout(row), False
            reference = f"pay-{uuid.uuid4().hex[:16]}"
            self._db.execute(
                "INSERT INTO payouts VALUES (?, ?, ?, ?, ?)",
                (key, reference, body.refund_id, body.amount_minor, body.currency),
            )
            return Payout(
                payout_reference=reference,
                refund_id=body.refund_id,
                amount_minor=body.amount_minor,
                currency=body.currency,
                idempotency_key=key,
            ), True

    def of(self, refund_id: str | None) -> list[Payout]:
        with self._lock:
            rows = self._db.execute(
                "SELECT payout_reference, refund_id, amount_minor, currency, idempotency_key"
                " FROM payouts WHERE ? IS NULL OR refund_id = ? ORDER BY rowid",
                (refund_id, refund_id),
            ).fetchall()
        return [_payout(row) for row in rows]


def _payout(row: Any) -> Payout:
    reference, refund_id, amount, currency, key = row
    return Payout(
        payout_reference=reference,
        refund_id=refund_id,
        amount_minor=amount,
        currency=currency,
        idempotency_key=key,
    )


def create_app(settings: PaymentsSettings) -> FastAPI:
    ledger = Ledger(settings.db)
    refused = {c.strip().upper() for c in settings.refused_currencies.split(",") if c.strip()}
    app = FastAPI(title="payment partner (stand-in)")
    first_calls = 0

    @app.post("/refunds", response_model=Payout, status_code=201)
    async def pay(
        body: RefundBody, idempotency_key: Annotated[str, Header(min_length=1)]
    ) -> Payout:
        nonlocal first_calls
        if body.currency in refused:
            raise HTTPException(422, f"payouts in {body.currency} are not supported")
        if settings.fail_every and not ledger.of(body.refund_id):
            first_calls += 1
            if first_calls % settings.fail_every == 0:
                raise HTTPException(503, "the payment rail is busy; try again")
        payout, _new = ledger.pay(idempotency_key, body)
        return payout

    @app.get("/refunds", response_model=list[Payout])
    async def payouts(refund_id: Annotated[str | None, Query()] = None) -> list[Payout]:
        return ledger.of(refund_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> int:
    settings = PaymentsSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
