"""pod-capture: carriers' proofs of delivery, matched to dispatched orders.

Two processes, one package:

- ``opsflow run services.pod_capture``: the runtime service (``service``) that
  keeps the dispatched bookings (``dispatch.executed``) in PostgreSQL
  (``services.pod_capture.service``);
- ``python -m services.pod_capture``: the webhook carriers POST their PODs to
  (``POST /pods``, authenticated with producers' API keys). A POD matching a
  dispatched order becomes ``pod.captured`` on the pod topic, once; one that
  does not is answered with a 4xx problem and recorded as ``pod.rejected`` on
  the pod-rejects topic (``services.pod_capture.pods``).

Importing the package loads only the runtime service, not the web app.
"""

from services.pod_capture.service import remember, service

__all__ = ["remember", "service"]
