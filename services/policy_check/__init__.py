"""The policy-check service: ``opsflow run services.policy_check``.

Consumes ``order.received``, judges each order with the declarative rules in
``rules/`` (see ``services.policy_check.rules`` for the language) and emits
``policy.checked``: AUTO_APPROVED, NEEDS_REVIEW or REJECTED with reason codes.
"""

from services.policy_check.service import RULES, check, service

__all__ = ["RULES", "check", "service"]
