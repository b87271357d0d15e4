"""The operator console: the on-call operator's commands as server-rendered pages.

``python -m opsflow.console`` (a program of every stack, like the projector)
serves, under ``/console``, for people with the ``operator`` role only:

- the overview: the local stack's components and their health (what
  ``opsflow status`` shows; deployed elsewhere, the orchestrator owns the
  processes), each service's consumer lag per input topic and processed/s,
  the read models' positions, pending dead letters and the application's
  gauges (``opsflow.overview``);
- the dead letters grouped as ``opsflow dlq list`` groups them, one dead letter
  with why it failed (``dlq show``), and its redrive (``dlq redrive``), after a
  confirmation page saying what will be written where and who reads it;
- the read models with their positions (``opsflow projections list``), and a
  rebuild of one after a confirmation page (``opsflow projections rebuild``), run
  in a background thread of this process with its progress on the page
  (``opsflow.console.rebuilds``);
- an instance's trace: its causal tree with times, producers, actors and where
  it stands now (``opsflow trace``);
- a replay: the range chosen as ``opsflow replay`` takes it, its dry run's report
  (``opsflow.replay``, what ``--dry-run`` computes), and the replay itself after
  that page as its confirmation;
- the operator actions taken here, newest first.

Every page calls the commands' own library code (``opsflow.dlq``,
``opsflow.trace``, ``opsflow.overview``, ``opsflow.projections``,
``opsflow.replay``), so the
console and the CLI cannot disagree. It knows no workflow: topics, read models
and the trace's verdict come from the application in use (``opsflow.application``).

Every action is authenticated and audited: the person signs in with their
token (``opsflow.web.pages``: sessions, CSRF, the same defences as a human
step's inbox), the role is checked on every request, and an action is
recorded as an operator action event naming its actor before it takes effect
and with its outcome after, as the CLI records its own (``opsflow.operator_actions``:
the ``opsflow.operator-actions`` topic, and ``operator_actions`` as its read model).
A redrive is at most once per dead letter by construction (``dlq_redrives``, under
the redrive lock): a
second confirmation, a reload or a second operator writes nothing and is told
when it was redriven already.

Why a process of its own and not pages of an existing service: a redrive
writes to any topic of record, which only the operator's Kafka principal may
(``opsflow acls``), and reading every dead-letter topic and every consumer
group's offsets is the operator's too; no service of the workflow should hold
those rights. The console runs with the operator's credentials, one replica.
"""

from __future__ import annotations

from opsflow.console.settings import ConsoleSettings

__all__ = ["ConsoleSettings"]
