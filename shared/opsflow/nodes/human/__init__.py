"""The human task: a workflow step that waits, for hours if need be, for a person.

An event that needs a person opens a task (the application's opener service
turns it into the step's requested event, with the reasons and an SLA due
time); people claim, release, approve or reject it over HTTP or in the inbox
pages, each action an event carrying the authenticated actor; a task past its
first SLA moves to supervisors (escalated), and past theirs is recorded as
breached. The application declares the step (``HumanTask``: its event
classes, enums and settings) and runs it with ``serve``.

**State lives in the log.** Task state and due times are the step's topic
itself: on start the service replays it (``read_committed``, from the
beginning, to its end) into an in-memory table, then keeps following it, and
every change it makes is an event on that topic first. Timers are durable for
the same reason: due times and fired timers are events, so after any stop the
rebuilt table fires each overdue timer once, in deadline order.

**Why not faust tables.** faust-streaming's changelog-backed tables would keep
the same state, but their consistency with the outputs needs its
``exactly_once`` guarantee, and that does not start on the embedded broker
(aiokafka ``UnknownError``, measured in ``make bench``); without it a crash
between a table update and its changelog write can lose or repeat a decision.
The same bench measured faust at 2.5x the opsflow runtime's CPU per event and
201 MB against 110 MB. So tasks are opened by the opsflow runtime (exactly
once) and the table is rebuilt from the step's topic, which is the truth
anyway: replaying 500 tasks (about 1,500 events) took 0.5 s in the reference
application's tests (logged as "<step> topic replayed"), and there is no second
copy of the state (a changelog topic) that could drift from the log.

**Instances share the work.** The step's process serves the API and runs the
task opener, the topic reader and the timers in threads (``feed``). Run as
many as you like: the opener's consumer group splits the step's inputs
between them, every one reads the whole topic into its own table and answers
the API from it, and a change to a task (a person's action, a timer) is made
in a turn on that task that every instance takes through PostgreSQL
(``transitions``), starting from the task's last recorded event: a decision is
taken once and a timer fires once, whichever instances race, and an instance
killed at any moment leaves nothing half done that the others do not finish.

Modules: ``spec`` (what an application declares), ``tasks`` (the state
machine, deterministic), ``desk`` (turns: record, write, apply),
``transitions`` (the turns' locks and records in PostgreSQL), ``feed``
(threads), ``api`` (HTTP), ``inbox`` (pages), ``sla`` (SLAs), ``clock`` (the
injectable clock), ``settings`` (the step's variables).
"""

from __future__ import annotations

import functools

from opsflow.nodes.human.settings import HumanTaskSettings
from opsflow.nodes.human.sla import load_sla
from opsflow.nodes.human.spec import HumanTask, TaskEvents


def serve(spec: HumanTask) -> int:
    """The step's ``python -m`` entry point: check its settings, SLA file, database and
    broker, then serve the API, the opener, the reader and the timers until stopped.

    Returns:
        The exit status: 0 after a clean stop, 2 when something is unusable (one
        line on stderr says what).
    """
    from opsflow.nodes.human.api import create_app
    from opsflow.web import server

    settings = spec.settings
    return server.main(
        spec.name,
        settings,
        functools.partial(create_app, spec),
        check=lambda s: load_sla(s.sla_file, f"{settings.prefix()}SLA_FILE"),
    )


__all__ = ["HumanTask", "HumanTaskSettings", "TaskEvents", "serve"]
