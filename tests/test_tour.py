"""The README's tour, run as it is written, against the stack `make run` starts.

A newcomer copies the tour's lines into a shell: this test takes the block
between the ``<!-- tour -->`` markers and runs it with bash, after starting
the stack as ``make run`` does (durable broker store, every service), in a data
directory of its own. Only the path of the ``opsflow`` command is adapted to
the interpreter running the tests.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.stack import ROOT, Stack, stack_env

# The README's tour on a stack of its own, as a newcomer runs it.
pytestmark = pytest.mark.process


def tour_script() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- tour -->", 1)[1].split("<!-- /tour -->", 1)[0]
    lines = block.strip().splitlines()
    assert lines[0] == "```sh" and lines[-1] == "```", "the tour is one sh code block"
    return "\n".join(lines[1:-1])


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("tour") / "data"
    stack = Stack(data_dir, stack_env(data_dir, OPSFLOW_SERVICES="true"))
    stack.run("up", "--detach", timeout=300)
    yield stack
    stack.run("down", check=False)


def test_the_readme_tour_runs_as_written(running: Stack) -> None:
    script = tour_script().replace(".venv/bin/opsflow", f"{shlex.quote(sys.executable)} -m opsflow")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=running.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    decoder = json.JSONDecoder()
    accepted, _ = decoder.raw_decode(out)
    assert accepted["event_type"] == "order.received" and accepted["offset"] >= 0, accepted
    demo = out[out.index("Demo run") : out.index('{"count":')]
    assert "every order reached the end of the workflow" in demo
    assert "ord-tour-0001" in demo.split("note:")[-1], "trace does not show the order"
    bookings, end = decoder.raw_decode(out, out.index('{"count":'))
    assert "ord-tour-0001" in {b["order_id"] for b in bookings["bookings"]}
    inbox = out[end:].strip()
    assert re.fullmatch(r"Reviewers sign in at http://127\.0\.0\.1:\d+/inbox with \S+", inbox)
    assert "Using the stack running from" not in done.stderr, "the tour sets the variables"


def test_the_example_order_is_what_the_ingest_api_takes() -> None:
    from opsflow.producer import body_model
    from services.contracts import OrderReceived

    body = json.loads((ROOT / "docs" / "examples" / "order.json").read_text())
    assert body_model(OrderReceived).model_validate(body).order_id == "ord-tour-0001"
