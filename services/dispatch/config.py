"""The dispatch service's settings, from the environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DispatchSettings(BaseSettings):
    """``DISPATCH_*`` variables, plus ``CARRIER_URL``.

    Attributes:
        carrier_url: the carrier's booking API (``CARRIER_URL``); the carrier
            stand-in of ``opsflow up`` by default.
        carrier: the carrier's name written into dispatch events.
        concurrency: bookings in flight at once (a bounded pool).
        timeout_s: one booking call's time limit.
        max_attempts: calls per booking before it is given up as
            ``dispatch.failed`` (transient, retries exhausted).
        backoff_s / backoff_max_s: first and largest wait between calls
            (doubling, with jitter).
    """

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore")

    carrier_url: str = Field(default="http://127.0.0.1:8700", alias="CARRIER_URL")
    carrier: str = "simcarrier"
    concurrency: int = Field(default=64, ge=1)
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)
