"""Configuration of the carrier stand-in: every ``CARRIER_*`` variable in one class.

- ``CARRIER_HOST``, ``CARRIER_PORT`` (``127.0.0.1``, ``8700``): where it listens.
- ``CARRIER_NAME`` (``simcarrier``): the ``carrier`` field of its proofs of delivery.
- ``CARRIER_DB`` (``:memory:``): SQLite file keeping the bookings across restarts.
- ``CARRIER_PUBLIC_URL`` (``http://HOST:PORT``): base of the ``tracking_url`` it hands out.
- ``CARRIER_DELIVERY_DAYS`` (``2``): ``estimated_delivery_at`` is this long after booking.
- ``CARRIER_LOG_LEVEL`` (``INFO``; ``WARNING`` drops the line per booking),
  ``CARRIER_ACCESS_LOG`` (``false``): uvicorn's line per request.
- The initial fault plan (see ``FaultPlan``; default: no faults): ``CARRIER_ERROR_RATE``,
  ``CARRIER_TIMEOUT_RATE``, ``CARRIER_TIMEOUT_S``, ``CARRIER_SLOW_RATE``, ``CARRIER_SLOW_S``,
  ``CARRIER_GHOST_RATE``, ``CARRIER_GHOST_MODE``, ``CARRIER_SEED``, and the comma-separated
  ``CARRIER_REFUSED_COUNTRIES`` and ``CARRIER_REFUSED_CITIES``.
- ``CARRIER_POD_WEBHOOK_URL`` (unset: no proofs sent): where proofs of delivery are POSTed,
  with ``Authorization: Bearer <CARRIER_POD_API_KEY>`` when that is set,
  ``CARRIER_POD_DELAY_S`` (``2``) after the booking, at most ``CARRIER_POD_CONCURRENCY``
  (``16``) at once, each attempt timing out after ``CARRIER_POD_TIMEOUT_S`` (``5``), retried
  after ``CARRIER_POD_BACKOFF_S`` (``0.2``) doubling up to ``CARRIER_POD_BACKOFF_MAX_S`` (``10``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.carrier_sim.faults import FaultPlan

NonNegative = Annotated[float, Field(ge=0.0)]


class CarrierSettings(BaseSettings, FaultPlan):
    """The stand-in's settings; the fault fields are inherited from ``FaultPlan``."""

    model_config = SettingsConfigDict(env_prefix="CARRIER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    name: str = "simcarrier"
    db: str = ":memory:"
    public_url: str | None = None
    delivery_days: NonNegative = 2.0
    log_level: str = "INFO"
    access_log: bool = False

    pod_webhook_url: str | None = None
    pod_api_key: SecretStr | None = None
    pod_delay_s: NonNegative = 2.0
    pod_concurrency: int = Field(default=16, ge=1)
    pod_timeout_s: NonNegative = 5.0
    pod_backoff_s: NonNegative = 0.2
    pod_backoff_max_s: NonNegative = 10.0

    @field_validator("pod_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value or None

    def fault_plan(self) -> FaultPlan:
        """The fault plan the carrier starts with."""
        return FaultPlan.model_validate(self.model_dump(include=set(FaultPlan.model_fields)))

    def base_url(self) -> str:
        """Base of the URLs the carrier hands out (tracking links)."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")
