"""The object store the embedded broker keeps its log in: an S3 subset shaped by how Tansu uses it.

Tansu's S3 engine turns every Kafka request into object-store calls (its
``tansu-storage/src/dynostore.rs``): a fetch that has data to return *lists the
partition's ``records/`` folder* and then reads one object per record batch; a
produce writes one object per batch and rewrites ``watermark.json`` (and, for
idempotent and transactional producers, ``meta.json``) with conditional
``PUT``s that carry ``If-Match: <etag>`` and are retried on 412.

The general-purpose local S3 server this replaced walked the *whole bucket*
on every listing (10 ms per list with 333 objects, growing with every topic's
history: `make run`'s 200-instance reference demo spent 64 s of its 88 s in listings, and
the server, saturated at ~100 requests/s, made every hop wait seconds), closed
the connection after every 404/412, and answered a ``GET`` with the body of one
version and the ETag of the next when a write landed in between, so the
broker's compare-and-set lost updates: concurrent idempotent and transactional
producers failed with ``OUT_OF_ORDER_SEQUENCE_NUMBER``.

This store keeps, in one process:
- an in-memory sorted index of every key (loaded by one walk at start), so a
  listing costs a bisection plus the keys it returns, never a directory walk;
- each object's ETag (MD5 of its content, as S3 does for single-part objects)
  and recent bodies in memory, so a ``GET`` returns a body and the ETag of that
  same body, and ``If-None-Match`` answers 304 without sending it again;
- conditional writes checked and applied with no await in between on one event
  loop: the check and the write are atomic without a lock.

Objects are files under ``DATA_ROOT/BUCKET/KEY`` (written aside, then renamed),
the same layout as before, so an existing data directory is read as it is. A
write is answered once the file is renamed into place: it survives kill -9 of
the store or the broker (the page cache keeps it), not a power loss (no fsync,
like a single Kafka broker with its default flush settings).

Only the broker may use it: every request must be signed (AWS Signature
Version 4, ``opsflow.stack.sigv4``) with the access key the store is given in
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, the variables the broker
signs with; anything else is answered 403.

Run as ``python -m opsflow.stack.bucket DATA_ROOT --port N`` with those two set.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import re
import struct
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import uvicorn
from sortedcontainers import SortedList

from opsflow.stack import compaction
from opsflow.stack.sigv4 import AccessKey, Refused, Verifier

_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Files being written carry this prefix until they are renamed into place.
_TEMP_PREFIX = ".opsflow-partial-"
# What the S3 server this store replaced left of writes it never finished.
_OLD_TEMP_PREFIX = ".localbucket-"
# S3 pages listings at 1,000 keys unless asked otherwise; the broker follows
# continuation tokens either way, so a larger page saves it round trips when
# a partition holds many batches.
_DEFAULT_PAGE = 10_000
# Bodies kept in memory: the newest batches are read by every consumer group
# right after they are written, and metadata objects are read on every fetch.
_CACHE_BYTES = 64 * 1024 * 1024
_MAX_BODY = 64 * 1024 * 1024
_RECORDS = "/records/"
# Small objects the broker rewrites all the time (``watermark.json`` on every
# produce, group state and offsets on every commit) are written in place into one
# of two slot files, alternately, each slot a sequence number, a length and a
# CRC before the body: no file is created or renamed per write (that cost
# 1.5-1.9 ms a write under the demo's load and saturated the store at 100
# instances/s), and a torn slot is recognised at start, when the other one holds
# the previous version. Record batches are written once each: a file, written
# aside and renamed.
_SLOTS = (".slot-a", ".slot-b")
_SLOT_HEADER = struct.Struct(">QII")


def _in_slots(key: str) -> bool:
    return key.endswith(".json")


def _read_slot(path: Path) -> tuple[int, bytes] | None:
    """A slot's sequence and body, or None if it is missing or torn."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < _SLOT_HEADER.size:
        return None
    sequence, length, crc = _SLOT_HEADER.unpack_from(raw)
    body = raw[_SLOT_HEADER.size : _SLOT_HEADER.size + length]
    if len(body) != length or zlib.crc32(body) != crc:
        return None
    return sequence, body


@dataclass(frozen=True)
class CompactionPolicy:
    """Which batches compaction (``opsflow.stack.compaction``) merges, and how often it looks.

    A partition's newest batches are what consumers at the tail read: they are
    left as they are. Older small ones are merged into batches of about
    ``merged_bytes``. Merging young batches too matters under load: the broker
    lists every batch of a partition on each fetch that finds records, and at
    100 instances/s a partition gained about 100 batches a second. Leaving 30 s of
    them (the first policy) grew each listing to thousands of keys during a run;
    a paced 1,000-instance reference demo took 13.8 s of broker CPU then, 8.1 s with batches
    merged after one second. A fetch that listed a batch merged away meanwhile
    reads a placeholder (``compaction.placeholder``) and fetches again.

    Batches merged at the tail end up about ``small_bytes`` large (a merged batch
    stops growing once it is that large). Once ``settled_s`` old, batches up to
    half of ``merged_bytes`` merge again, so a long history keeps one object per
    few megabytes and the listing every fetch makes stays short (1,000,000
    records of history: about 150 objects a partition at 1 MiB, each listing
    0.1 ms more for the store alone than at 30 objects).
    """

    keep_newest: int = 16
    min_age_s: float = 1.0
    small_bytes: int = 256 * 1024
    merged_bytes: int = 4 * 1024 * 1024
    every_s: float = 1.0
    settled_s: float = 60.0
    # How long a merged-away batch is answered with a placeholder.
    placeholder_s: float = 60.0


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class S3Error(Exception):
    """An S3 error response: HTTP status, S3 error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _no_such_key() -> S3Error:
    return S3Error(404, "NoSuchKey", "The specified key does not exist.")


def _precondition_failed() -> S3Error:
    return S3Error(412, "PreconditionFailed", "At least one of the preconditions did not hold.")


@dataclass(slots=True)
class StoredObject:
    """What the index knows of one object; the body itself is on disk (and maybe cached)."""

    size: int
    modified: float
    # MD5 of the content; None for objects found on disk at start until first read.
    etag: str | None
    # The rendered <Contents> element of a listing, made once.
    listed: str | None = None
    # For record batches: the parsed header, once compaction looked at it.
    batch: compaction.BatchHeader | None = None

    def listing(self, key: str) -> str:
        if self.listed is None:
            stamp = datetime.fromtimestamp(self.modified, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
            etag = f"<ETag>&quot;{self.etag}&quot;</ETag>" if self.etag else ""
            self.listed = (
                f"<Contents><Key>{escape(key)}</Key><LastModified>{stamp[:-3]}Z</LastModified>"
                f"{etag}<Size>{self.size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            )
        return self.listed


def _etag_matches(header: str, etag: str | None) -> bool:
    candidates = {value.strip().removeprefix("W/").strip('"') for value in header.split(",")}
    return "*" in candidates or (etag is not None and etag in candidates)


class Bucket:
    """One bucket: a folder of files and the sorted index of its keys."""

    def __init__(self, name: str, folder: Path, cache: BodyCache, policy: CompactionPolicy) -> None:
        self.name = name
        self.folder = folder
        self._cache = cache
        self.policy = policy
        self._objects: dict[str, StoredObject] = {}
        self._keys: SortedList = SortedList()
        # Partitions' records folders written since compaction last looked.
        self.dirty: set[str] = set()
        # Slot-written objects: their bodies (always in memory) and last sequence.
        self._slotted: dict[str, tuple[bytes, int]] = {}
        # Batches merged away, answered with an empty placeholder for a while (see
        # ``compaction.placeholder``): key -> (object, body, when to forget it).
        self._merged_away: dict[str, tuple[StoredObject, bytes, float]] = {}

    def load(self) -> None:
        """Index what is on disk (one walk, at start); leftovers of interrupted writes go."""
        slotted: set[Path] = set()
        for directory, _, files in os.walk(self.folder):
            for name in files:
                path = Path(directory, name)
                if name.startswith((_TEMP_PREFIX, _OLD_TEMP_PREFIX)):
                    path.unlink(missing_ok=True)
                elif name.endswith(_SLOTS):
                    slotted.add(path.with_suffix(""))
                else:
                    stat = path.stat()
                    key = path.relative_to(self.folder).as_posix()
                    self._objects[key] = StoredObject(stat.st_size, stat.st_mtime, None)
        for path in slotted:
            versions = [v for v in map(_read_slot, _slot_paths(path)) if v is not None]
            if not versions:
                continue
            sequence, body = max(versions)
            key = path.relative_to(self.folder).as_posix()
            modified = max(p.stat().st_mtime for p in _slot_paths(path) if p.exists())
            self._slotted[key] = (body, sequence)
            self._objects[key] = StoredObject(len(body), modified, _md5(body))
        self._keys.update(self._objects)
        self._drop_covered()
        # Compaction looks at every partition once: batches written before a
        # restart (or by a store that could not merge them) are merged too.
        self.dirty.update(_records_folder(key) for key in self._objects if _is_batch(key))

    def _drop_covered(self) -> None:
        """Delete batches a merged batch already holds: what a compaction stopped
        between renaming the merged batch into place and deleting the ones it replaced
        leaves behind."""
        covered_to, folder = -1, ""
        for key in [key for key in self._keys if _is_batch(key)]:
            if _records_folder(key) != folder:
                covered_to, folder = -1, _records_folder(key)
            base = _base_offset(key)
            if base < covered_to:
                self.delete(key)
                continue
            with self._path(key).open("rb") as file:
                header = compaction.BatchHeader.parse(file.read(compaction.HEADER_SIZE))
            covered_to = base + header.last_offset_delta + 1

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if (
            any(part in ("", ".", "..") for part in parts)
            or any(part.startswith(_TEMP_PREFIX) for part in parts)
            or key.endswith(_SLOTS)
        ):
            raise S3Error(400, "InvalidArgument", f"This store does not accept the key {key!r}.")
        return self.folder.joinpath(*parts)

    def head(self, key: str) -> StoredObject:
        found = self._objects.get(key)
        if found is None:
            raise _no_such_key()
        if found.etag is None:
            self.read(key)
        return found

    def read(self, key: str) -> tuple[StoredObject, bytes]:
        """The object and its body, which belong to the same version."""
        found = self._objects.get(key)
        if found is None:
            merged_away = self._merged_away.get(key)
            if merged_away is not None:
                return merged_away[0], merged_away[1]
            raise _no_such_key()
        slotted = self._slotted.get(key)
        if slotted is not None:
            return found, slotted[0]
        body = self._cache.get((self.name, key))
        if body is None:
            body = self._path(key).read_bytes()
            if found.etag is None:
                found.etag = _md5(body)
            self._cache.put((self.name, key), body)
        return found, body

    def write(self, key: str, body: bytes, *, if_match: str, if_none_match: str) -> StoredObject:
        """Write the object if its preconditions hold; check and write are one step."""
        path = self._path(key)
        current = self.head(key) if key in self._objects else None
        if if_none_match and current is not None and _etag_matches(if_none_match, current.etag):
            raise _precondition_failed()
        if if_match and (current is None or not _etag_matches(if_match, current.etag)):
            raise _precondition_failed()
        if _in_slots(key):
            self._write_slot(key, path, body)
        else:
            _write_file(path, body)
            self._cache.put((self.name, key), body)
        stored = StoredObject(len(body), time.time(), _md5(body))
        if current is None:
            self._keys.add(key)
        self._objects[key] = stored
        if _is_batch(key):
            self.dirty.add(_records_folder(key))
        return stored

    def _write_slot(self, key: str, path: Path, body: bytes) -> None:
        """Overwrite the older of the key's two slots with the new version."""
        _, last = self._slotted.get(key, (b"", 0))
        sequence = last + 1
        if last == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        record = _SLOT_HEADER.pack(sequence, len(body), zlib.crc32(body)) + body
        fd = os.open(_slot_paths(path)[sequence % 2], os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, record, 0)
        finally:
            os.close(fd)
        self._slotted[key] = (body, sequence)
        if last == 0:
            path.unlink(missing_ok=True)  # the whole-file version a store before this one wrote

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self._objects.pop(key, None) is not None:
            self._keys.remove(key)
            self._cache.drop((self.name, key))
            self._slotted.pop(key, None)
            for stale in (path, *_slot_paths(path)):
                stale.unlink(missing_ok=True)

    def keys_from(self, prefix: str, after: str) -> Iterator[str]:
        """Keys that start with ``prefix`` and sort after ``after``, in S3 (UTF-8) order."""
        start = max(prefix, after)
        for key in self._keys.irange(minimum=start, inclusive=(True, True)):
            if not key.startswith(prefix):
                return
            if key != after:
                yield key

    def listing(
        self, *, prefix: str, delimiter: str, after: str, skip_prefix: str, limit: int
    ) -> tuple[list[str], list[str], str | None]:
        """One page: keys, common prefixes, and the continuation marker if there is more."""
        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        for key in self.keys_from(prefix, after):
            if skip_prefix and key.startswith(skip_prefix):
                continue
            if len(contents) + len(prefixes) >= limit:
                return contents, prefixes, last or None
            index = key.find(delimiter, len(prefix)) if delimiter else -1
            if index >= 0:
                skip_prefix = key[: index + len(delimiter)]
                prefixes.append(skip_prefix)
                last = f"P:{skip_prefix}"
            else:
                contents.append(key)
                last = f"K:{key}"
        return contents, prefixes, None

    def compact(self, folder: str, *, after: str, now: float) -> str | None:
        """Merge the next run of old, small, contiguous batches in ``folder`` found after
        the key ``after``; the key to go on from, or None when there is nothing more.

        The merged batch replaces the run's first object (renamed into place), then
        the others are deleted, all with no await in between: a listing sees the
        run or the merged batch, never a mix. A fetch that listed the run before
        and reads one of the deleted objects after gets an empty placeholder
        (``compaction.placeholder``): measured, a missing object made the broker
        drop the client's connection.
        """
        policy = self.policy
        keys = list(self.keys_from(folder, ""))
        run: list[str] = []
        run_bytes, expected = 0, -1
        for key in keys[: max(len(keys) - policy.keep_newest, 0)]:
            if key <= after:
                continue
            stored = self._objects[key]
            if stored.modified > now - policy.min_age_s:
                break
            base, header = _base_offset(key), self._batch_header(key)
            settled = stored.modified <= now - policy.settled_s
            small = stored.size < policy.small_bytes or (
                settled and stored.size <= policy.merged_bytes // 2
            )
            fits = header.mergeable and small and run_bytes + stored.size <= policy.merged_bytes
            if run and fits and base == expected:
                run.append(key)
                run_bytes += stored.size
            elif len(run) > 1:
                break
            else:
                run, run_bytes = ([key], stored.size) if fits else ([], 0)
            expected = base + header.last_offset_delta + 1
        if len(run) < 2:
            return None
        merged = compaction.merge([(_base_offset(key), self.read(key)[1]) for key in run])
        header = compaction.BatchHeader.parse(merged)
        target = self._path(run[0])
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(merged)
            # Its time is its newest record's, so time lookups (the broker answers
            # them from object times) never skip a record of the run.
            stamp_ns = header.max_timestamp * 1_000_000
            os.utime(partial, ns=(stamp_ns, stamp_ns))
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        self._objects[run[0]] = StoredObject(
            len(merged),
            header.max_timestamp / 1000,
            _md5(merged),
            batch=header,
        )
        self._cache.drop((self.name, run[0]))
        forget_at = now + self.policy.placeholder_s
        for key in run[1:]:
            replaced = self._batch_header(key)
            self.delete(key)
            body = compaction.placeholder(replaced)
            stored = StoredObject(len(body), now, _md5(body), batch=replaced)
            self._merged_away[key] = (stored, body, forget_at)
        return run[0]

    def forget_merged_away(self, now: float) -> None:
        """Drop placeholders no fetch can still be reading (its listing is long past)."""
        for key in [k for k, (_, _, at) in self._merged_away.items() if at <= now]:
            del self._merged_away[key]

    def _batch_header(self, key: str) -> compaction.BatchHeader:
        stored = self._objects[key]
        if stored.batch is None:
            stored.batch = compaction.BatchHeader.parse(self.read(key)[1])
        return stored.batch

    def stored(self, key: str) -> StoredObject:
        return self._objects[key]

    def is_empty(self) -> bool:
        return not self._objects


def _md5(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def _slot_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + _SLOTS[0]), path.with_name(path.name + _SLOTS[1])


def _write_file(path: Path, body: bytes) -> None:
    """Write aside and rename: a reader or a restart sees the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(body)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _is_batch(key: str) -> bool:
    return _RECORDS in key and key.endswith(".batch")


def _records_folder(key: str) -> str:
    return key[: key.rindex("/") + 1]


def _base_offset(key: str) -> int:
    """A batch object's base offset: the broker names it ``<offset:020>.batch``."""
    return int(key[key.rindex("/") + 1 : -len(".batch")])


class BodyCache:
    """Recently written or read bodies, least recently used dropped first, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._bodies: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def get(self, key: tuple[str, str]) -> bytes | None:
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def put(self, key: tuple[str, str], body: bytes) -> None:
        self.drop(key)
        if len(body) > self._budget // 4:
            return
        self._bodies[key] = body
        self._used += len(body)
        while self._used > self._budget:
            _, evicted = self._bodies.popitem(last=False)
            self._used -= len(evicted)

    def drop(self, key: tuple[str, str]) -> None:
        body = self._bodies.pop(key, None)
        if body is not None:
            self._used -= len(body)


class ObjectStore:
    """All buckets under one data root."""

    def __init__(
        self,
        root: Path,
        *,
        cache_bytes: int = _CACHE_BYTES,
        compaction: CompactionPolicy | None = None,
    ) -> None:
        self.root = root
        self._cache = BodyCache(cache_bytes)
        self.policy = compaction or CompactionPolicy()
        self.buckets: dict[str, Bucket] = {}
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and _BUCKET_NAME.match(entry.name):
                bucket = Bucket(entry.name, entry, self._cache, self.policy)
                bucket.load()
                self.buckets[entry.name] = bucket

    def bucket(self, name: str) -> Bucket:
        found = self.buckets.get(name)
        if found is None:
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist.")
        return found

    async def compact_forever(self) -> None:
        """Merge old small batches of the partitions written since the last look, for ever."""
        while True:
            await asyncio.sleep(self.policy.every_s)
            for bucket in list(self.buckets.values()):
                bucket.forget_merged_away(time.time())
                folders, bucket.dirty = bucket.dirty, set()
                for folder in sorted(folders):
                    after: str | None = ""
                    while after is not None:
                        after = bucket.compact(folder, after=after, now=time.time())
                        # One run at a time: requests are served in between.
                        await asyncio.sleep(0)
                    if len(list(bucket.keys_from(folder, ""))) > self.policy.keep_newest:
                        bucket.dirty.add(folder)  # what was too young is looked at again

    def create_bucket(self, name: str) -> bool:
        """Make the bucket; False when it was there already."""
        if name in self.buckets:
            return False
        if not _BUCKET_NAME.match(name):
            raise S3Error(400, "InvalidBucketName", f"The bucket name {name!r} is not valid.")
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        self.buckets[name] = Bucket(name, folder, self._cache, self.policy)
        return True


class Request:
    """What the S3 handlers need of one HTTP request."""

    def __init__(self, scope: Scope, body: bytes) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.bucket, _, self.key = self.path.lstrip("/").partition("/")
        self.raw_query: str = scope["query_string"].decode("latin-1")
        self.query = dict(parse_qsl(self.raw_query, True))
        # As sent, repeated names included: the signature covers them so.
        self.header_list = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        ]
        self.headers: dict[str, str] = dict(self.header_list)
        self.body = body

    def header(self, name: str) -> str:
        return self.headers.get(name, "").strip()


Response = tuple[int, list[tuple[bytes, bytes]], bytes]


def _object_headers(stored: StoredObject) -> list[tuple[bytes, bytes]]:
    return [
        (b"etag", f'"{stored.etag}"'.encode()),
        (b"last-modified", formatdate(stored.modified, usegmt=True).encode()),
        (b"content-type", b"application/octet-stream"),
    ]


def _xml(body: str) -> Response:
    return (
        200,
        [(b"content-type", b"application/xml")],
        f'<?xml version="1.0" encoding="UTF-8"?>\n{body}'.encode(),
    )


class S3App:
    """The ASGI application: the S3 calls the broker makes, and nothing else, signed."""

    def __init__(self, store: ObjectStore, verifier: Verifier) -> None:
        self.store = store
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_BODY:
                status, headers, body = self._error(S3Error(413, "EntityTooLarge", "Too large."))
                break
            chunks.append(chunk)
            if not message.get("more_body"):
                request = Request(scope, b"".join(chunks))
                try:
                    status, headers, body = self.handle(request)
                except S3Error as err:
                    status, headers, body = self._error(err)
                break
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Compaction runs beside the server for as long as it serves."""
        compactor: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                compactor = asyncio.create_task(self.store.compact_forever())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if compactor is not None:
                    compactor.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    def _error(err: S3Error) -> Response:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{err.code}</Code>'
            f"<Message>{escape(err.message)}</Message></Error>"
        )
        return err.status, [(b"content-type", b"application/xml")], body.encode()

    def handle(self, request: Request) -> Response:
        try:
            self.verifier.verify(
                method=request.method,
                path=request.path,
                raw_query=request.raw_query,
                headers=request.header_list,
                body=request.body,
            )
        except Refused as refused:
            raise S3Error(403, refused.code, refused.message) from refused
        method, bucket_name, key = request.method, request.bucket, request.key
        if not bucket_name:
            if method == "GET":
                return self._list_buckets()
            raise S3Error(501, "NotImplemented", f"{method} / is not supported.")
        if not key:
            if method == "PUT":
                if self.store.create_bucket(bucket_name):
                    return 200, [], b""
                raise S3Error(409, "BucketAlreadyOwnedByYou", "The bucket exists already.")
            bucket = self.store.bucket(bucket_name)
            if method == "GET":
                return self._list_objects(bucket, request)
            if method == "HEAD":
                return 200, [], b""
            if method == "POST" and "delete" in request.query:
                return self._delete_objects(bucket, request.body)
            raise S3Error(501, "NotImplemented", f"{method} on a bucket is not supported.")
        bucket = self.store.bucket(bucket_name)
        if method == "GET":
            stored, body = bucket.read(key)
            if_none_match = request.header("if-none-match")
            if if_none_match and _etag_matches(if_none_match, stored.etag):
                return 304, _object_headers(stored), b""
            return 200, _object_headers(stored), body
        if method == "HEAD":
            stored = bucket.head(key)
            return 200, _object_headers(stored), b""
        if method == "PUT":
            if request.header("x-amz-copy-source"):
                raise S3Error(501, "NotImplemented", "Copying objects is not supported.")
            stored = bucket.write(
                key,
                request.body,
                if_match=request.header("if-match"),
                if_none_match=request.header("if-none-match"),
            )
            return 200, [(b"etag", f'"{stored.etag}"'.encode())], b""
        if method == "DELETE":
            bucket.delete(key)
            return 204, [], b""
        raise S3Error(501, "NotImplemented", f"{method} on an object is not supported.")

    def _list_buckets(self) -> Response:
        names = "".join(
            f"<Bucket><Name>{name}</Name><CreationDate>1970-01-01T00:00:00.000Z</CreationDate></Bucket>"
            for name in self.store.buckets
        )
        return _xml(
            f'<ListAllMyBucketsResult xmlns="{_NAMESPACE}"><Owner><ID>opsflow</ID></Owner>'
            f"<Buckets>{names}</Buckets></ListAllMyBucketsResult>"
        )

    def _list_objects(self, bucket: Bucket, request: Request) -> Response:
        query = request.query
        if query.get("list-type") != "2":
            raise S3Error(501, "NotImplemented", "Only ListObjectsV2 (list-type=2) is supported.")
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        try:
            limit = int(query.get("max-keys", _DEFAULT_PAGE))
        except ValueError:
            limit = -1
        if limit < 0:
            raise S3Error(400, "InvalidArgument", "max-keys must be a non-negative integer.")
        after, skip_prefix = query.get("start-after", ""), ""
        token = query.get("continuation-token")
        if token is not None:
            try:
                resume = base64.urlsafe_b64decode(token.encode()).decode()
            except ValueError:
                resume = ""
            if resume[:2] not in ("K:", "P:"):
                raise S3Error(400, "InvalidArgument", "The continuation token is not valid.")
            after = resume[2:]
            skip_prefix = after if resume.startswith("P:") else ""
        contents, prefixes, marker = bucket.listing(
            prefix=prefix, delimiter=delimiter, after=after, skip_prefix=skip_prefix, limit=limit
        )
        parts = [
            f'<ListBucketResult xmlns="{_NAMESPACE}"><Name>{bucket.name}</Name>',
            f"<Prefix>{escape(prefix)}</Prefix>",
            f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
            f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>{limit}</MaxKeys>",
            f"<IsTruncated>{'true' if marker else 'false'}</IsTruncated>",
        ]
        if token is not None:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if marker:
            next_token = base64.urlsafe_b64encode(marker.encode()).decode()
            parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        parts.extend(bucket.stored(key).listing(key) for key in contents)
        parts.extend(
            f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
        )
        parts.append("</ListBucketResult>")
        return _xml("".join(parts))

    def _delete_objects(self, bucket: Bucket, body: bytes) -> Response:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as err:
            raise S3Error(
                400, "MalformedXML", f"The delete request is not valid XML: {err}"
            ) from err
        deleted = []
        for element in root.iter():
            if element.tag.rsplit("}", 1)[-1] == "Key" and element.text:
                bucket.delete(element.text)
                deleted.append(f"<Deleted><Key>{escape(element.text)}</Key></Deleted>")
        return _xml(f'<DeleteResult xmlns="{_NAMESPACE}">{"".join(deleted)}</DeleteResult>')


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m opsflow.stack.bucket")
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--compact-after",
        type=float,
        default=CompactionPolicy.min_age_s,
        help="seconds a record batch stays as written before it may be merged",
    )
    parser.add_argument(
        "--keep-newest",
        type=int,
        default=CompactionPolicy.keep_newest,
        help="batches at each partition's end that are never merged",
    )
    parser.add_argument(
        "--settle-after",
        type=float,
        default=CompactionPolicy.settled_s,
        help="seconds after which merged batches merge again into larger ones",
    )
    args = parser.parse_args()
    key = AccessKey(
        os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    )
    if not key.id or not key.secret:
        sys.exit(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set: the store takes only "
            "requests signed with them (give the broker the same two)"
        )
    data_root = args.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    policy = CompactionPolicy(
        min_age_s=args.compact_after, keep_newest=args.keep_newest, settled_s=args.settle_after
    )
    store = ObjectStore(data_root, compaction=policy)
    uvicorn.run(
        S3App(store, Verifier(key)),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # The broker's HTTP client keeps idle connections for 90 s: closing
        # them sooner makes it find dead connections and retry.
        timeout_keep_alive=300,
    )


if __name__ == "__main__":
    main()
