"""The one exception hierarchy of opsflow.

Callers decide what to do from the type, never from a message: a
``RetryableError`` may succeed if tried again, a ``PermanentError`` will not,
a ``BadInputError`` names the input that was wrong and a ``ConfigurationError``
names the setting (usually an environment variable) and what to do about it.
"""

from __future__ import annotations

import sys


class OpsflowError(Exception):
    """Root of every error opsflow raises on purpose."""

    retryable: bool = False


class RetryableError(OpsflowError):
    """A transient failure: the same call may succeed later (broker down, timeout)."""

    retryable = True


class AwaitingError(RetryableError):
    """The input needs a record not seen yet: an earlier event of its instance on
    another topic, read concurrently, usually arrives a moment later.

    Retried like any transient failure, but not for ever: a predecessor that
    never comes (lost upstream, a forged or mistyped reference) must not stall
    its partition, so the worker dead-letters the input with this reason once
    the service's ``RetryPolicy.max_waits`` tries are used up.
    """


class PermanentError(OpsflowError):
    """A failure that trying again cannot fix."""


class BadInputError(PermanentError):
    """Input that does not satisfy its contract; the message names what is wrong."""


class ConfigurationError(OpsflowError):
    """A setting is missing, malformed or points at something unusable.

    Args:
        variable: the environment variable (or option) at fault.
        problem: what is wrong with it, in a few words.
        hint: what the user can do next.
    """

    def __init__(self, variable: str, problem: str, hint: str) -> None:
        self.variable = variable
        self.problem = problem
        self.hint = hint
        super().__init__(f"{variable}: {problem}. {hint}")


def transient(err: BaseException) -> bool:
    """Whether the same work may succeed if tried again later.

    A ``RetryableError``, and the failures of a counterpart rather than of the
    input: PostgreSQL restarting, unreachable or dropping the connection
    (``psycopg.OperationalError``, the pool's timeout among them, but not a
    value too large for an index), a socket refused or reset
    (``ConnectionError``), a timeout. A worker retries these
    with backoff (the partition waits, nothing is lost) instead of
    dead-lettering an input that did nothing wrong; an error that belongs to
    the input (a constraint, a bad value, a bug) is not transient.
    """
    if isinstance(err, RetryableError | ConnectionError | TimeoutError):
        return True
    # Only psycopg raises psycopg's errors: not imported, not one of them.
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(err, psycopg.OperationalError):
        return False
    # A value too large for an index (SQLSTATE class 54) is the input's, however
    # often it is tried: psycopg files it with the counterpart's failures.
    return not isinstance(err, psycopg.errors.ProgramLimitExceeded)
