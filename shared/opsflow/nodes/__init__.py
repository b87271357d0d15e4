"""Workflow steps any application configures rather than copies.

- ``effect``: a side effect on an external partner, made once per request: the
  request's idempotency key travels with every call, transient failures are
  retried with capped, jittered backoff, the answer is an accepted result or a
  refusal the application turns into its failure event;
- ``rules``: versioned rules as data (YAML), checked at load with file-and-line
  errors and evaluated as a pure function of the subject: the application says
  which fields of its subject rules may test and which outcomes they decide.
"""
