"""``python -m services.carrier_sim``: run the carrier stand-in until stopped."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from opsflow.logs import configure
from services.carrier_sim.app import create_app
from services.carrier_sim.config import CarrierSettings


def main() -> int:
    """Serve on ``CARRIER_HOST:CARRIER_PORT``; a bad variable is one line and exit code 2."""
    try:
        settings = CarrierSettings()
    except ValidationError as err:
        for error in err.errors():
            variable = f"CARRIER_{str(error['loc'][0]).upper()}" if error["loc"] else "CARRIER_*"
            print(f"error: {variable}: {error['msg']}", file=sys.stderr)
        return 2
    configure("carrier_sim", level=settings.log_level.upper())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_config=None,  # keep opsflow's JSON lines
        log_level=settings.log_level.lower(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
