"""Fault injection: which requests the stand-in carrier fails, delays or refuses.

A real carrier fails in a few distinct ways and a booking client must survive
each of them: it refuses to work (503, nothing recorded), it hangs (504 or no
answer at all), it is slow, it books and then loses the answer (a "ghost"
booking: only a retry with the same idempotency key tells the client it
succeeded), and it permanently refuses some destinations. Every random choice
comes from one seeded generator, so a run with the same seed and the same
sequence of requests fails the same requests.
"""

from __future__ import annotations

import enum
import random
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]


class FaultPlan(BaseModel):
    """What to inject; the body of ``PUT /faults`` and the ``CARRIER_*`` fault variables.

    Rates are probabilities per booking request, drawn in this order and
    stopping at the first hit: ``error_rate`` (503 before anything is
    recorded), ``timeout_rate`` (wait ``timeout_s``, then 504, nothing
    recorded), ``slow_rate`` (wait ``slow_s``, then book normally). Then, only
    for a request that records a new booking, ``ghost_rate``: the booking is
    kept but the answer is lost (``ghost_mode`` "error": an immediate 503;
    "timeout": wait ``timeout_s``, then 504).
    """

    model_config = ConfigDict(extra="forbid")

    error_rate: Rate = 0.0
    timeout_rate: Rate = 0.0
    timeout_s: Seconds = 10.0
    slow_rate: Rate = 0.0
    slow_s: Seconds = 0.5
    ghost_rate: Rate = 0.0
    ghost_mode: Literal["error", "timeout"] = "error"
    # NoDecode: the variables are comma-separated ("KP,IR"), not JSON lists.
    refused_countries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    refused_cities: Annotated[list[str], NoDecode] = Field(default_factory=list)
    seed: int | None = None

    @field_validator("refused_countries", "refused_cities", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("refused_countries")
    @classmethod
    def _country_codes(cls, value: list[str]) -> list[str]:
        return [country.strip().upper() for country in value]

    @field_validator("refused_cities")
    @classmethod
    def _city_names(cls, value: list[str]) -> list[str]:
        return [city.strip().casefold() for city in value]


class Fault(enum.Enum):
    """What happens to a booking request before the carrier looks at it."""

    NONE = "none"
    ERROR = "error"
    TIMEOUT = "timeout"
    SLOW = "slow"


class FaultInjector:
    """Draws faults for a plan from one generator seeded with the plan's seed.

    Setting a new plan reseeds, so ``PUT /faults`` with the same seed replays
    the same sequence of faults.
    """

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)

    def replace(self, plan: FaultPlan) -> None:
        """Use ``plan`` from now on and restart its random sequence."""
        self.plan = plan
        self._rng = random.Random(plan.seed)

    def _hit(self, rate: float) -> bool:
        # No draw at rate 0, so a plan's sequence does not depend on unused faults.
        return rate > 0.0 and self._rng.random() < rate

    def before_booking(self) -> Fault:
        """The fault, if any, for the next booking request."""
        plan = self.plan
        if self._hit(plan.error_rate):
            return Fault.ERROR
        if self._hit(plan.timeout_rate):
            return Fault.TIMEOUT
        if self._hit(plan.slow_rate):
            return Fault.SLOW
        return Fault.NONE

    def ghost(self) -> bool:
        """Whether the answer to a booking just recorded is to be lost."""
        return self._hit(self.plan.ghost_rate)

    def refusal(self, *, country: str, city: str) -> str | None:
        """Why the carrier refuses this destination, or None when it serves it."""
        if country.strip().upper() in self.plan.refused_countries:
            return f"the carrier does not deliver to country {country.strip().upper()!r}"
        if city.strip().casefold() in self.plan.refused_cities:
            return f"the carrier does not deliver to city {city.strip()!r}"
        return None
