"""``onehop``: sustained events/s of one consume-decode-encode-produce hop, end to end.

The same hop, ``order.received`` in and one event out per input, is run by:

- **raw**: confluent-kafka and fastavro with nothing around them, exactly once
  with opsflow's transaction batching (``tests/bench/hops.py``): the floor of
  what any Python service on this client can cost;
- **opsflow**: the real runtime running ``tests.services.relay``;
- **faust**: a faust-streaming agent, exactly once if the broker lets it;
- **faststream**: a FastStream batch subscriber, at-least-once (no transactions);
- **quix**: a Quix Streams application, ``processing_guarantee="exactly-once"``,
  in an environment of its own (``tests/bench/quixenv.py``: it pins older
  confluent-kafka and pydantic than opsflow).

Protocol, the same for each system, on topics of its own (6 partitions):

1. The input topic is loaded with the same ``--events`` records (WireCodec
   bytes of ``services.demo.orders.varied_order``) *before* the system starts, so
   it runs flat out on a backlog.
2. The system is started as a process; throughput is counted on the output
   topic (read_committed, as a downstream service sees it) from the first
   output to the last, so startup and group joining are excluded.
3. Latency cannot be measured on a backlog: an input loaded before the system
   started waits for all the inputs before it, so "output minus input
   timestamp" would measure the position in the queue. Once the backlog is
   drained, ``PROBES`` more records are produced at a steady ``PROBE_RATE``
   (well below every system's capacity) and the hop latency of each is its
   output record's timestamp minus its input record's.
4. Peak RSS of the process and its children is sampled throughout.
5. Correctness: every input has exactly one output (by key: order ids are
   unique), and nothing was dead-lettered.

The embedded broker runs with the memory store for this case: its durable
store fails under concurrent transactional producers, which opsflow's
per-partition producers are.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

import psutil
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.contracts.wire import WireCodec
from opsflow.runtime.service import BatchPolicy
from opsflow.topics import ensure_topics
from services.demo.orders import varied_order
from tests.bench.harness import REPO_DIR, BenchError, Case, Metric, Ratio, StackInfo
from tests.bench.quixenv import quix_python, quix_version
from tests.support.stack import STACK_VARIABLES

EVENTS = 200_000
PARTITIONS = 6  # as TopicSettings' default, so opsflow runs as many producers as in use
PROBES = 2_000
PROBE_RATE = 500.0  # events/s: a fraction of the slowest system's rate, so nothing queues
STARTUP_TIMEOUT_S = 120.0  # to the first output
WALL_CAP_S = {"raw": 300.0, "opsflow": 300.0, "faust": 240.0, "faststream": 300.0, "quix": 300.0}
QUIET_S = 3.0  # after the last expected output, to catch late duplicates
SYSTEMS = ("raw", "opsflow", "faust", "faststream", "quix")
GUARANTEE = {
    "raw": "exactly once",
    "opsflow": "exactly once",
    "faust": "exactly once",
    "faststream": "at-least-once",
    "quix": "exactly once",
}
BATCH = BatchPolicy()


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Framed ``order.received`` records: the backlog, then the latency probes."""

    backlog: list[tuple[bytes, bytes]]
    probes: list[tuple[bytes, bytes]]
    schema: str  # the writer schema the registry holds for the records' header id


def make_inputs(registry_url: str, events: int, probes: int, seed: int = 20250314) -> Inputs:
    """``events + probes`` different orders as WireCodec writes them, keyed by order id.

    Generated one at a time and kept only as bytes: 200,000 event models would
    hold far more memory than their ~80 MB of records.
    """
    codec = WireCodec(SchemaRegistryClient({"url": registry_url}))
    rng = random.Random(seed)
    records = []
    for n in range(events + probes):
        event = varied_order(n, rng)
        records.append((event.order_id.encode(), codec.encode(event)))
    schema_id = int.from_bytes(records[0][1][1:5], "big")
    schema = SchemaRegistryClient({"url": registry_url}).get_schema(schema_id).schema_str
    if not schema:
        raise BenchError(f"onehop: the registry has no schema text for id {schema_id}")
    return Inputs(records[:events], records[events:], schema)


def _admin(bootstrap: str) -> AdminClient:
    # Warnings only: at info level a discarded client prints its queue purge to the table.
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})


def load(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    """Produce ``records`` as fast as the broker takes them (large batches, lingering)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
        }
    )
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0:
        raise BenchError(f"onehop: loading {topic} did not finish")


# --- watching a system under test ---------------------------------------------------------


def cpu_seconds(process: psutil.Process | None) -> float:
    """User and system CPU time used so far by ``process`` and its live descendants."""
    if process is None:
        return math.nan
    total = 0.0
    with contextlib.suppress(psutil.Error):  # the process, or a child, has just gone
        for proc in (process, *process.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


class Sampler:
    """Samples the resident memory of a process and all its descendants on a thread.

    Sampling (every 50 ms) can miss a short spike, but a service's steady-state
    footprint, which is what a sizing decision needs, is what it sees.
    """

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cpu_seconds(self) -> float:
        """User and system CPU time used so far by the process and its live descendants."""
        return cpu_seconds(self.process)

    def sample(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):  # the process, or a child, has just gone
            for proc in (self.process, *self.process.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Output:
    """What the watcher saw of one system's output topic."""

    keys: list[bytes] = field(default_factory=list)
    timestamps: dict[bytes, int] = field(default_factory=dict)
    first_seen: float | None = None
    first_count: int = 0


class Watcher:
    """A read_committed consumer of the output topic, in this process.

    It only notes each record's key (and the probes' timestamps), so it takes
    little of the CPU the system under test also needs.
    """

    def __init__(self, bootstrap: str, topic: str, probe_keys: set[bytes]) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-watch-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 20,
            }
        )
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.probe_keys = probe_keys
        self.out = Output()

    def poll(self, timeout: float = 0.1) -> int:
        """Read what has arrived; returns how many records."""
        batch = [m for m in self.consumer.consume(2_000, timeout) if m.error() is None]
        if not batch:
            return 0
        now = time.monotonic()
        if self.out.first_seen is None:
            self.out.first_seen, self.out.first_count = now, len(batch)
        for msg in batch:
            key = msg.key() or b""
            self.out.keys.append(key)
            if key in self.probe_keys:
                self.out.timestamps[key] = msg.timestamp()[1]
        return len(batch)

    def close(self) -> None:
        self.consumer.close()


# --- one run of one system ----------------------------------------------------------------


@dataclass
class Run:
    """The figures of one system's run, and what a reader must know about them."""

    rate: float
    rss_mb: float
    cpu_us: float
    broker_cpu_us: float
    p50_ms: float
    p99_ms: float
    startup_s: float
    counted: int
    capped: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class System:
    """How to start one system on its topics, and where they are."""

    name: str
    command: list[str]
    env: dict[str, str]
    input_topic: str
    output_topic: str
    dead_letter_topic: str | None = None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, not interpolated."""
    if not sorted_values:
        return math.nan
    rank = max(math.ceil(q * len(sorted_values)) - 1, 0)
    return sorted_values[rank]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, as a deployment stops a service; SIGKILL if it does not go in time."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_system(
    system: System,
    inputs: Inputs,
    bootstrap: str,
    log: Path,
    cap_s: float,
    broker: psutil.Process | None = None,
) -> tuple[Run, Output]:
    """Load the backlog, start ``system``, count its outputs, probe its latency, stop it.

    ``broker``, the embedded broker's process, is charged its CPU time over the
    same window: on one machine, what a system makes the broker do is CPU the
    system itself does not get.

    Raises:
        BenchError: it printed no output within ``STARTUP_TIMEOUT_S``, or exited early.
    """
    began = time.monotonic()
    load(bootstrap, system.input_topic, inputs.backlog)
    took = time.monotonic() - began
    print(f"  {system.name}: loaded {len(inputs.backlog):,} events in {took:.1f}s", flush=True)
    expected = len(inputs.backlog)
    probe_keys = {key for key, _ in inputs.probes}
    watcher = Watcher(bootstrap, system.output_topic, probe_keys)
    notes: list[str] = []
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            system.command,
            cwd=REPO_DIR,
            env=system.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: stopped whole, spared our Ctrl-C
        )
    sampler = Sampler(proc.pid)
    launched = time.monotonic()
    try:
        count, capped, finished, cpu_first, broker_first = 0, False, launched, 0.0, 0.0
        while count < expected:
            new = watcher.poll()
            if new and count == 0:
                cpu_first, broker_first = sampler.cpu_seconds(), cpu_seconds(broker)
            count += new
            now = time.monotonic()
            if proc.poll() is not None:
                raise BenchError(
                    f"onehop: {system.name} exited with {proc.returncode} after {count:,} "
                    f"outputs\n{_tail(log)}"
                )
            if watcher.out.first_seen is None:
                if now - launched > STARTUP_TIMEOUT_S:
                    raise BenchError(
                        f"onehop: {system.name} wrote nothing in {STARTUP_TIMEOUT_S:.0f}s\n"
                        f"{_tail(log)}"
                    )
            elif now - watcher.out.first_seen > cap_s:
                capped = True
                break
            finished = now
        cpu_last, broker_last = sampler.cpu_seconds(), cpu_seconds(broker)
        first_seen = watcher.out.first_seen
        assert first_seen is not None
        counted = count - watcher.out.first_count
        rate = counted / (finished - first_seen) if finished > first_seen else math.nan
        cpu_us = (cpu_last - cpu_first) / counted * 1e6 if counted else math.nan
        broker_us = (broker_last - broker_first) / counted * 1e6 if counted else math.nan
        startup = first_seen - launched
        if capped:
            notes.append(
                f"{system.name}: capped at {cap_s:.0f}s after its first output; the rate is "
                f"over the {count:,} of {expected:,} events it did, latency not measured"
            )
            latencies: list[float] = []
        else:
            latencies = _probe(bootstrap, system.input_topic, inputs.probes, watcher)
            deadline = time.monotonic() + QUIET_S
            while time.monotonic() < deadline:
                watcher.poll()
    finally:
        _stop(proc)
        peak = sampler.stop()
        watcher.close()
    latencies.sort()
    run = Run(
        rate=rate,
        rss_mb=peak / 2**20,
        cpu_us=cpu_us,
        broker_cpu_us=broker_us,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        startup_s=startup,
        counted=count,
        capped=capped,
        notes=notes,
    )
    return run, watcher.out


def _probe(
    bootstrap: str, topic: str, probes: Sequence[tuple[bytes, bytes]], watcher: Watcher
) -> list[float]:
    """Produce the probes at ``PROBE_RATE`` while reading outputs; each one's hop latency in ms.

    The latency is output record timestamp minus input record timestamp: both
    are stamped by a producer on this machine, so one clock is read twice.
    """
    sent: dict[bytes, int] = {}

    def delivered(err: Any, msg: Message) -> None:
        if err is None:
            sent[msg.key() or b""] = msg.timestamp()[1]

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    began = time.monotonic()
    for n, (key, value) in enumerate(probes):
        due = began + n / PROBE_RATE
        while (wait := due - time.monotonic()) > 0:
            watcher.poll(min(wait, 0.01))
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 60
    while len(watcher.out.timestamps) < len(probes) and time.monotonic() < deadline:
        watcher.poll()
    return [
        float(watcher.out.timestamps[key] - sent[key])
        for key in sent
        if key in watcher.out.timestamps
    ]


def verify(name: str, run: Run, out: Output, inputs: Inputs, dead_letters: int) -> None:
    """Exactly one output per input, none extra, none dead-lettered (a capped run: no dupes).

    Raises:
        BenchError: with the first few offending keys.
    """
    counts = Counter(out.keys)
    seen = set(counts)
    duplicates = [key for key, n in counts.items() if n > 1]
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates):,} duplicate outputs, e.g. {duplicates[:3]}")
    if dead_letters:
        problems.append(f"{dead_letters:,} inputs dead-lettered")
    if not run.capped:
        wanted = {key for key, _ in inputs.backlog} | {key for key, _ in inputs.probes}
        missing = wanted - seen
        extra = seen - wanted
        if missing:
            problems.append(f"{len(missing):,} inputs without output, e.g. {sorted(missing)[:3]}")
        if extra:
            problems.append(f"{len(extra):,} outputs of no input, e.g. {sorted(extra)[:3]}")
    if problems:
        raise BenchError(f"onehop: {name} is not correct: {'; '.join(problems)}")


def _records_on(bootstrap: str, topic: str) -> int:
    """How many records ``topic`` holds (committed or not): the dead letters' count."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    try:
        return sum(
            high - low
            for low, high in (
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in range(PARTITIONS)
            )
        )
    finally:
        consumer.close()


# --- the case -----------------------------------------------------------------------------


def _metrics(guarantees: Mapping[str, str] | None = None) -> tuple[Metric, ...]:
    """The figures of every system; ``guarantees`` relabels those that ran with another."""
    metrics = []
    for name in SYSTEMS:
        guarantee = (guarantees or {}).get(name, GUARANTEE[name])
        metrics += [
            Metric(f"{name}_rate", f"{name} throughput, {guarantee}"),
            Metric(
                f"{name}_rss",
                f"{name} peak RSS",
                "MB",
                lower_is_better=True,
                target=150.0 if name == "opsflow" else None,
            ),
            Metric(f"{name}_cpu", f"{name} CPU per event", "us", lower_is_better=True),
            Metric(
                f"{name}_broker_cpu", f"{name} broker's CPU per event", "us", lower_is_better=True
            ),
            Metric(f"{name}_p50", f"{name} hop latency p50", "ms", lower_is_better=True),
            Metric(f"{name}_p99", f"{name} hop latency p99", "ms", lower_is_better=True),
        ]
    return tuple(metrics)


class OneHopCase(Case):
    """Sustained throughput, memory and latency of the one-hop pass-through, five ways."""

    name: ClassVar[str] = "onehop"
    summary: ClassVar[str] = (
        "order.received -> decode -> encode -> produce; raw, opsflow, faust, faststream, quix"
    )
    default_repeat: ClassVar[int] = 1
    stack_overrides: ClassVar[Mapping[str, str]] = {"OPSFLOW_BROKER_STORAGE": "memory"}
    metrics: ClassVar[tuple[Metric, ...]] = _metrics()
    ratios: ClassVar[tuple[Ratio, ...]] = (
        Ratio("vs_raw", "throughput opsflow/raw", "opsflow_rate", "raw_rate", target=0.5),
        Ratio("vs_faust", "throughput opsflow/faust", "opsflow_rate", "faust_rate", target=3.0),
        Ratio(
            "vs_faststream",
            "throughput opsflow/faststream",
            "opsflow_rate",
            "faststream_rate",
            target=1.0,
        ),
        Ratio("vs_quix", "throughput opsflow/quix", "opsflow_rate", "quix_rate", target=1.2),
    )

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        super().__init__(stack, events=events)
        self.events = events or EVENTS
        self.probes = min(PROBES, max(self.events // 10, 100))
        self.workdir = Path(tempfile.mkdtemp(prefix="opsflow-onehop-"))
        # The baselines that try exactly once first, with what they really ran with,
        # and why they fell back to at-least-once if they did.
        self.guarantees = {"faust": "exactly_once", "quix": "exactly_once"}
        self.fallbacks: dict[str, str] = {}
        self.quix = ""
        self.runs: dict[str, list[Run]] = {name: [] for name in SYSTEMS}

    def params(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "partitions": PARTITIONS,
            "latency_probes": self.probes,
            "probe_rate_per_s": PROBE_RATE,
            "batch_max_events": BATCH.max_events,
            "batch_max_interval_s": BATCH.max_interval_s,
            "faust_processing_guarantee": self.guarantees["faust"],
            "quix_processing_guarantee": self.guarantees["quix"].replace("_", "-"),
            "quix_version": self.quix,
            "wall_cap_s": WALL_CAP_S,
            "mean_value_bytes": round(
                sum(len(v) for _, v in self.inputs.backlog) / len(self.inputs.backlog), 1
            ),
            "runs": {
                name: [
                    {
                        "startup_s": round(r.startup_s, 2),
                        "outputs": r.counted,
                        "capped": r.capped,
                    }
                    for r in runs
                ]
                for name, runs in self.runs.items()
            },
        }

    def labelled_metrics(self) -> tuple[Metric, ...]:
        """The faust and quix rows say which guarantee they really ran with (see ``_run``)."""
        return _metrics({name: "AT-LEAST-ONCE" for name in self.fallbacks})

    def notes(self) -> list[str]:
        notes = [
            f"latency: {self.probes:,} probes at {PROBE_RATE:.0f}/s after the backlog drained; "
            "output minus input record timestamp",
            "targets: opsflow >= 0.5x raw, >= 3x faust, >= 1.2x quix exactly once, "
            ">= 1x faststream at-least-once, <= 150 MB RSS",
            f"quix: {self.quix}, in an environment of its own (tests/bench/quixenv.py)",
        ]
        for name, why in self.fallbacks.items():
            notes.append(
                f"{name} ran AT-LEAST-ONCE: exactly once did not start on this broker ({why})"
            )
        for runs in self.runs.values():
            for run in runs:
                notes += run.notes
        startups = ", ".join(
            f"{name} {statistics.median(r.startup_s for r in runs):.1f}s"
            for name, runs in self.runs.items()
            if runs
        )
        notes.append(f"startup to first output (excluded from throughput): {startups}")
        return notes

    def close(self) -> None:
        """Remove the logs and faust's and quix's state; a failure's log tail is in its error."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def prepare(self) -> None:
        """Build the inputs once (the same bytes for every system) and the baselines' schema.

        Raises:
            BenchError: a baseline's framework is not installed; said before the
                minutes of building inputs rather than after.
        """
        missing = [name for name in ("faust", "faststream") if find_spec(name) is None]
        if missing:
            raise BenchError(
                f"onehop needs {' and '.join(missing)} installed; see the dev extra in "
                "pyproject.toml (faust-streaming, faststream[kafka])"
            )
        self.bootstrap = self.stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        self.registry = self.stack.env["SCHEMA_REGISTRY_URL"]
        self.inputs = make_inputs(self.registry, self.events, self.probes)
        self.schema_file = self.workdir / "order.received.avsc"
        self.schema_file.write_text(self.inputs.schema, encoding="utf-8")
        self.quix_python = quix_python()
        self.quix = quix_version(self.quix_python)

    def _env(self, **extra: str) -> dict[str, str]:
        """This environment minus anything that points elsewhere, plus the stack's addresses.

        OTLP export is off (as by default): its collector is not part of the hop.
        """
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in STACK_VARIABLES and not k.startswith("OTEL_")
        }
        env.update(self.stack.env)
        env.update(extra)
        return env

    def _system(self, name: str, guarantee: str = "exactly_once") -> System:
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        if name == "opsflow":
            topics = [f"{prefix}orders", f"{prefix}orders.dlq", f"{prefix}policy-check"]
            ensure_topics(_admin(self.bootstrap), topics, partitions=PARTITIONS)
            return System(
                name,
                [sys.executable, "-m", "opsflow.runtime", "tests.services.relay"],
                # Kafka transactions, whatever the shell says: the mode compared here.
                self._env(OPSFLOW_TOPIC_PREFIX=prefix, OPSFLOW_DELIVERY="transactions"),
                input_topic=topics[0],
                output_topic=topics[2],
                dead_letter_topic=topics[1],
            )
        topics = [f"{prefix}in", f"{prefix}out"]
        ensure_topics(_admin(self.bootstrap), topics, partitions=PARTITIONS)
        common = [
            f"--bootstrap={self.bootstrap}",
            f"--input={topics[0]}",
            f"--output={topics[1]}",
            f"--group={prefix}hop",
            f"--schema={self.schema_file}",
        ]
        if name == "quix":
            command = [
                str(self.quix_python),
                str(REPO_DIR / "tests" / "bench" / "quixhop.py"),
                *common,
                f"--state={self.workdir / f'{prefix}quix'}",
                f"--commit-every={BATCH.max_events}",
                f"--commit-interval={BATCH.max_interval_s}",
                f"--guarantee={guarantee.replace('_', '-')}",
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "tests.bench.hops",
                name,
                *common,
                f"--guarantee={guarantee}",
            ]
        return System(name, command, self._env(), input_topic=topics[0], output_topic=topics[1])

    def _run(self, name: str, repetition: int) -> Run:
        guarantee = self.guarantees.get(name, "exactly_once")
        if name in self.guarantees and guarantee == "exactly_once":
            try:
                return self._run_once(name, repetition, guarantee)
            except BenchError as err:
                # Exactly once needs transactions as the framework drives them; if the
                # broker refuses, the next best is what its users would run.
                self.guarantees[name] = guarantee = "at_least_once"
                errors = [line for line in str(err).splitlines() if "Error" in line]
                why = errors[-1].strip() if errors else str(err).splitlines()[0]
                self.fallbacks[name] = why
                print(f"  {name}: exactly once failed ({why}); at-least-once")
        return self._run_once(name, repetition, guarantee)

    def _run_once(self, name: str, repetition: int, guarantee: str) -> Run:
        system = self._system(name, guarantee)
        suffix = f"-{guarantee}" if name in self.guarantees else ""
        log = self.workdir / f"{name}{suffix}-{repetition + 1}.log"
        broker = psutil.Process(self.stack.broker_pid) if self.stack.broker_pid else None
        run, out = run_system(system, self.inputs, self.bootstrap, log, WALL_CAP_S[name], broker)
        dead = (
            _records_on(self.bootstrap, system.dead_letter_topic) if system.dead_letter_topic else 0
        )
        verify(name, run, out, self.inputs, dead)
        print(
            f"  {name}: {run.rate:,.0f} events/s, {run.rss_mb:,.0f} MB, "
            f"{run.cpu_us:,.0f} us CPU/event (broker {run.broker_cpu_us:,.0f}), "
            f"p50 {run.p50_ms:,.0f} ms, p99 {run.p99_ms:,.0f} ms "
            f"(startup {run.startup_s:.1f}s{', CAPPED' if run.capped else ''})",
            flush=True,
        )
        return run

    def measure(self, repetition: int) -> dict[str, float]:
        """Run each system once, on fresh topics; the order alternates between repetitions."""
        figures: dict[str, float] = {}
        sequence = SYSTEMS if repetition % 2 == 0 else tuple(reversed(SYSTEMS))
        for name in sequence:
            run = self._run(name, repetition)
            self.runs[name].append(run)
            figures[f"{name}_rate"] = run.rate
            figures[f"{name}_rss"] = run.rss_mb
            figures[f"{name}_cpu"] = run.cpu_us
            figures[f"{name}_broker_cpu"] = run.broker_cpu_us
            figures[f"{name}_p50"] = run.p50_ms
            figures[f"{name}_p99"] = run.p99_ms
        return figures
