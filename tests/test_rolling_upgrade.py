"""A rolling upgrade while traffic flows: two releases of a team's service side by side.

A team's one-service application (``opsflow new service``) is released twice:
release 1 answers with ``v1`` of its result contract, release 2 adds an optional
field (``v2.avsc``, backward and forward compatible). Two instances of release 1
run in one consumer group while a producer keeps sending requests; release 2 is
provisioned (its schema registered first), then rolled out the way a Deployment
does it: a new instance joins, an old one is stopped with SIGTERM, twice. Every
request has exactly one answer, both releases wrote answers, and each release
reads every answer, the other's included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from tests.support.runtime import Topics, settled_records, wait_until_processed
from tests.support.stack import QUICK_JOIN_ENV, ROOT, Stack, create_schema, drop_schema

pytestmark = pytest.mark.process

# The run of requests a producer sends until told to stop (a file appears).
_SEND = """
import pathlib, sys, time
from opsflow.producer import Producer, body_model
from {app}.contracts import Requested

stop, sent = pathlib.Path(sys.argv[1]), 0
with Producer("shop") as producer:
    while not stop.exists():
        producer.send(body_model(Requested)(request_id=f"r{{sent}}", name="Ada"),
                      idempotency_key=f"r{{sent}}")
        sent += 1
        time.sleep(0.005)
print(sent)
"""

# Each answer as this release reads it: its cause, the contract version it was
# written with, and the new field (None where the release does not know it).
_READ = """
import json, sys
from confluent_kafka.schema_registry import SchemaRegistryClient
from opsflow.contracts.wire import WireCodec
from opsflow.settings import RegistrySettings

codec = WireCodec(SchemaRegistryClient(RegistrySettings().client_config()))
read = []
for value in json.load(open(sys.argv[1])):
    event = codec.decode(bytes.fromhex(value))
    read.append([event.envelope.causation_id, event.envelope.contract_version,
                 getattr(event, "language", None)])
print(json.dumps(read))
"""


class Release:
    """One release of the team's application: its folder and its processes' environment."""

    def __init__(self, folder: Path, app: str, env: dict[str, str]) -> None:
        self.app = app
        self.env = {
            **env,
            "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT), str(ROOT / "shared")]),
            "OPSFLOW_APP": f"{app}.application:application",
        }
        self.started: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr}"
        return done.stdout

    def start(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, *args], env=self.env, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        self.started.append(proc)
        return proc


def _second_release(first: Path, second: Path, app: str) -> None:
    """Release 2: ``v2`` of the result, with an optional ``language``, which it fills in."""
    shutil.copytree(first, second)
    package = second / app
    schemas = package / "schemas" / f"{app}.greeted"
    schema = json.loads((schemas / "v1.avsc").read_text())
    schema["fields"].append(
        {"name": "language", "type": ["null", "string"], "default": None, "doc": "Of the greeting."}
    )
    (schemas / "v2.avsc").write_text(json.dumps(schema, indent=2))
    contracts = package / "contracts.py"
    text = contracts.read_text()
    v1 = f'event_type: ClassVar[str] = "{app}.greeted"\n    contract_version: ClassVar[int] = 1'
    assert v1 in text
    text = text.replace(v1, v1.replace("= 1", "= 2"))
    field = "    greeting: str\n"
    text = text.replace(field, f"{field}    language: str | None = None\n")
    contracts.write_text(text)
    service = package / "service.py"
    answer = "Greeted(request_id=request.request_id, greeting=greeting)"
    assert answer in service.read_text()
    service.write_text(service.read_text().replace(answer, answer[:-1] + ', language="en")'))


@pytest.fixture
def releases(stack: Stack, tmp_path: Path) -> Iterator[tuple[Release, Release]]:
    app = f"roll{uuid.uuid4().hex[:6]}"
    base = stack.address("DATABASE_URL")
    schema, database = create_schema(base)
    env = {
        **os.environ,
        **stack.addresses(),
        **QUICK_JOIN_ENV,
        "DATABASE_URL": database,
        "OPSFLOW_TOPIC_PREFIX": f"{app}.",
        # As on a cluster: provisioning registers schemas, services only look them up.
        "SCHEMA_REGISTRY_AUTO_REGISTER": "false",
    }
    first, second = tmp_path / "release-1", tmp_path / "release-2"
    first.mkdir()
    subprocess.run(
        [sys.executable, "-m", "opsflow", "new", "service", app, "--dir", str(first)],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    _second_release(first / app, second / app, app)
    both = Release(first / app, app, env), Release(second / app, app, env)
    yield both
    for proc in both[0].started + both[1].started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    drop_schema(base, schema)


def _assigned(log: Path, proc: subprocess.Popen[bytes], *, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while b'"assigned"' not in log.read_bytes():
        assert proc.poll() is None, f"exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"never assigned:\n{log.read_text()}"
        time.sleep(0.05)


def test_a_rolling_upgrade_under_traffic_answers_every_request_once_in_either_release(
    stack: Stack, releases: tuple[Release, Release], tmp_path: Path
) -> None:
    old, new = releases
    app, prefix = old.app, old.env["OPSFLOW_TOPIC_PREFIX"]
    old.run("-m", "opsflow.provision")
    stop = tmp_path / "stop-sending"
    sender = subprocess.Popen(
        [sys.executable, "-c", _SEND.format(app=app), str(stop)],
        env=old.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        logs = [tmp_path / f"old-{n}.log" for n in range(2)]
        running = [old.start(log, "-m", "opsflow.runtime", f"{app}.service") for log in logs]
        for log, proc in zip(logs, running, strict=True):
            _assigned(log, proc)
        # The new release's schemas first, then its instances, one old one out per new one in.
        new.run("-m", "opsflow.provision")
        for n in range(2):
            log = tmp_path / f"new-{n}.log"
            proc = new.start(log, "-m", "opsflow.runtime", f"{app}.service")
            _assigned(log, proc)
            retiring = running.pop(0)
            retiring.send_signal(signal.SIGTERM)
            assert retiring.wait(30) == 0, "the old instance stops cleanly"
            running.append(proc)
        time.sleep(1)  # the new release answers traffic of its own
    finally:
        stop.touch()
        out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err
    sent = int(out)

    registry = stack.address("SCHEMA_REGISTRY_URL")
    topics = Topics(
        prefix,
        stack.address("KAFKA_BOOTSTRAP_SERVERS"),
        WireCodec(SchemaRegistryClient({"url": registry})),
        registry,
    )
    wait_until_processed(topics, service=app, topic=f"{prefix}{app}-requests")
    for proc in running:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    answers = tmp_path / "answers.json"
    records = settled_records(topics.bootstrap, f"{prefix}{app}-results")
    answers.write_text(json.dumps([msg.value().hex() for msg in records]))

    by_old, by_new = (json.loads(r.run("-c", _READ, str(answers))) for r in (old, new))
    causes = Counter(cause for cause, _, _ in by_new)
    assert len(causes) == sent and set(causes.values()) == {1}, "one answer per request"
    versions = Counter(version for _, version, _ in by_new)
    assert set(versions) == {1, 2}, f"both releases answered: {versions}"
    # The new release reads v1 answers with the field's default; the old one reads v2
    # answers without the field it does not know.
    assert {(v, lang) for _, v, lang in by_new} == {(1, None), (2, "en")}
    assert [row[:2] for row in by_old] == [row[:2] for row in by_new]
    assert {lang for _, _, lang in by_old} == {None}
