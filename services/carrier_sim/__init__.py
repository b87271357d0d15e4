"""A stand-in for an external shipping carrier, served over HTTP on loopback.

The dispatch service books shipments with it as it would with a real carrier;
tests and the demo use it to prove that no order is booked twice whatever the
carrier does: fail, hang, lose its answers after booking, refuse destinations,
or restart. After each booking it calls back with a proof of delivery. Run it
with ``python -m services.carrier_sim``; ``config`` lists its variables and
``app`` its endpoints.
"""

from services.carrier_sim.app import create_app
from services.carrier_sim.config import CarrierSettings
from services.carrier_sim.faults import FaultPlan

__all__ = ["CarrierSettings", "FaultPlan", "create_app"]
