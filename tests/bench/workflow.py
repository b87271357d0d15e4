"""``workflow``: the auto-approve path end to end, every service on this one machine.

A stack of its own is started with its services (``opsflow up`` with
``OPSFLOW_SERVICES=true``, memory broker as for every case), and demo orders
that policy approves go in through the ingest API's batch endpoint:

- **throughput**: a backlog of orders sent as fast as the batch endpoint takes
  them (1,000 per call); the rate is orders over the time from the first call
  to the last ``pod.captured`` (ingest, policy-check, dispatch with its
  carrier booking, the carrier's proof of delivery after its delay, pod-capture).
- **latency**: orders sent one per call at a fixed 100 orders/s; for each, the
  ``dispatch.executed`` record timestamp minus the ``order.received`` one
  (both stamped by producers on this machine: one clock, read twice).

Records are matched by key (the order id) and the event-type header, so the
watcher decodes nothing and takes little CPU from the services it measures.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
from confluent_kafka import Consumer

from services.demo.orders import Category, DemoOrder, demo_orders, new_run_id
from tests.bench.harness import BenchError, Case, Metric, StackInfo
from tests.support.stack import OPSFLOW, stack_env

ORDERS = 20_000
LATENCY_ORDERS = 1_500
LATENCY_RATE = 100.0  # orders/s
POD_DELAY_S = 0.2
BATCH = 1_000
SETTLE_TIMEOUT_S = 300.0


class _Watcher:
    """Reads the workflow's topics and notes when each order reached each step."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-watch-{uuid.uuid4().hex}",
                "auto.offset.reset": "latest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 6000,
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe(["orders", "dispatch", "pod"])
        self.received: dict[bytes, int] = {}
        self.executed: dict[bytes, int] = {}
        self.captured: dict[bytes, float] = {}
        self.failed: set[bytes] = set()
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(1000, 0.2):
                if msg.error() is not None:
                    continue
                key, topic = msg.key() or b"", msg.topic()
                if topic == "orders":
                    self.received.setdefault(key, msg.timestamp()[1])
                elif topic == "pod":
                    self.captured.setdefault(key, time.monotonic())
                else:
                    kind = dict(msg.headers() or []).get("opsflow-event-type")
                    if kind == b"dispatch.executed":
                        self.executed.setdefault(key, msg.timestamp()[1])
                    elif kind == b"dispatch.failed":
                        self.failed.add(key)
            if self.consumer.assignment():
                self.assigned.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


class WorkflowCase(Case):
    """Orders/s from the batch endpoint to pod.captured, and order-to-dispatch latency."""

    name: ClassVar[str] = "workflow"
    summary: ClassVar[str] = (
        f"auto-approved orders through every service ({ORDERS:,} unless --events; latency "
        f"at {LATENCY_RATE:.0f}/s)"
    )
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("orders_per_s", "orders/s, batch ingest to pod.captured", "orders/s", target=1000),
        Metric("p50_ms", "order.received to dispatch.executed p50", "ms", lower_is_better=True),
        Metric(
            "p99_ms",
            "order.received to dispatch.executed p99",
            "ms",
            lower_is_better=True,
            target=300,
        ),
    )
    default_repeat: ClassVar[int] = 3

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        super().__init__(stack, events=events)
        self.orders_count = events or ORDERS
        self._tmp = tempfile.TemporaryDirectory(prefix="opsflow-bench-workflow-")
        self.data_dir = Path(self._tmp.name) / "data"
        self.env = stack_env(
            self.data_dir,
            OPSFLOW_SERVICES="true",
            OPSFLOW_BROKER_STORAGE="memory",
            CARRIER_POD_DELAY_S=str(POD_DELAY_S),
        )
        self.up = False
        self.seed = 0

    def params(self) -> dict[str, Any]:
        return {
            "orders": self.orders_count,
            "batch": BATCH,
            "latency_orders": LATENCY_ORDERS,
            "latency_rate": LATENCY_RATE,
            "pod_delay_s": POD_DELAY_S,
        }

    def notes(self) -> list[str]:
        return [
            f"workflow: its own stack with every service; the carrier's proof of delivery "
            f"comes {POD_DELAY_S}s after booking and is inside the throughput window",
        ]

    def _opsflow(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPSFLOW, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def prepare(self) -> None:
        started = self._opsflow("up", "--detach")
        self.up = True
        if started.returncode != 0:
            raise BenchError(f"workflow: `opsflow up` failed\n{started.stdout}{started.stderr}")
        status = self._opsflow("status", "--json")
        self.addresses: dict[str, str] = json.loads(status.stdout)["env"]
        created = self._opsflow(
            "keys", "create", "--producer", "bench", DATABASE_URL=self.addresses["DATABASE_URL"]
        )
        if created.returncode != 0:
            raise BenchError(f"workflow: no API key: {created.stderr}")
        self.key = created.stdout.strip().splitlines()[-1]
        self.http = httpx.Client(
            base_url=self.addresses["INGEST_URL"],
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=120,
        )

    def _approved_orders(self, count: int) -> list[DemoOrder]:
        self.seed += 1
        made = demo_orders(int(count / 0.55) + 10, seed=self.seed, run_id=new_run_id(), now=_now())
        return [o for o in made if o.scenario.category is Category.AUTO_APPROVE][:count]

    def _send(self, orders: Sequence[DemoOrder]) -> None:
        response = self.http.post(
            "/events:batch",
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={
                "events": [{"event_type": "order.received", "event": o.as_json()} for o in orders]
            },
        )
        if response.status_code != 202:
            raise BenchError(f"workflow: ingest answered {response.status_code}: {response.text}")

    def measure(self, repetition: int) -> dict[str, float]:
        watcher = _Watcher(self.addresses["KAFKA_BOOTSTRAP_SERVERS"])
        watcher.start()
        try:
            if not watcher.assigned.wait(60):
                raise BenchError("workflow: the watcher got no partitions")
            time.sleep(1.0)  # let the "latest" positions settle before sending
            rate = self._throughput(watcher)
            p50, p99 = self._latency(watcher)
        finally:
            watcher.close()
        print(
            f"  workflow: {rate:,.0f} orders/s, order->dispatch p50 {p50:.0f} ms, p99 {p99:.0f} ms",
            flush=True,
        )
        return {"orders_per_s": rate, "p50_ms": p50, "p99_ms": p99}

    def _throughput(self, watcher: _Watcher) -> float:
        orders = self._approved_orders(self.orders_count)
        keys = {o.order_id.encode() for o in orders}
        began = time.monotonic()
        sender = threading.Thread(
            target=lambda: [
                self._send(orders[i : i + BATCH]) for i in range(0, len(orders), BATCH)
            ],
            daemon=True,
        )
        sender.start()
        deadline = began + SETTLE_TIMEOUT_S
        while True:
            done = sum(1 for k in keys if k in watcher.captured or k in watcher.failed)
            if done == len(keys):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"workflow: only {done:,} of {len(keys):,} orders finished")
            time.sleep(0.2)
        sender.join()
        failed = len(keys & watcher.failed)
        if failed:
            raise BenchError(f"workflow: {failed} orders failed dispatch with no faults injected")
        last = max(watcher.captured[k] for k in keys)
        return len(keys) / (last - began)

    def _latency(self, watcher: _Watcher) -> tuple[float, float]:
        orders = self._approved_orders(LATENCY_ORDERS)
        keys = [o.order_id.encode() for o in orders]
        interval, began = 1.0 / LATENCY_RATE, time.monotonic()
        for n, order in enumerate(orders):
            pause = began + n * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._send([order])
        deadline = time.monotonic() + 60
        while not all(k in watcher.executed for k in keys):
            if time.monotonic() > deadline:
                raise BenchError("workflow: latency orders did not all reach dispatch.executed")
            time.sleep(0.1)
        samples = sorted(watcher.executed[k] - watcher.received[k] for k in keys)
        return _percentile(samples, 0.50), _percentile(samples, 0.99)

    def close(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        if self.up:
            self._opsflow("down")
        self._tmp.cleanup()


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def _now() -> datetime:
    return datetime.now(UTC)
