"""The local S3 server the embedded broker keeps its log in: localbucket, made conditional.

The broker (Tansu) updates shared objects (watermarks, producer state) with
conditional writes, ``PUT`` with ``If-Match: <etag>``, and retries when
another writer got there first. localbucket honours ``If-None-Match: *`` but
ignores ``If-Match``, so two producers writing to one partition at once lose
each other's updates: measured here as ``OUT_OF_ORDER_SEQUENCE_NUMBER`` for
concurrent idempotent producers and failed ``AddPartitionsToTxn`` for
concurrent transactional ones, while the memory store had neither. This
handler checks ``If-Match`` against the object's current ETag and writes under
one lock, so check and write are atomic.

Run as ``python -m opsflow.stack.bucket DATA_ROOT --port N``.
"""

from __future__ import annotations

import argparse
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import localbucket


class ConditionalBucketHandler(localbucket.S3Handler):  # type: ignore[misc]
    """localbucket's S3 handler with ``If-Match`` honoured on object writes."""

    _write_lock = threading.Lock()

    def _write_object(self, bucket: str, key: str, write: Any) -> str:
        with self._write_lock:
            if_match = self.headers.get("If-Match", "").strip()
            if if_match:
                target = self._object_path(bucket, key)
                if not target.exists() or not localbucket.etag_matches(
                    if_match, localbucket.object_etag(target)
                ):
                    raise self._precondition_failed_error()
            etag: str = super()._write_object(bucket, key, write)
            return etag


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m opsflow.stack.bucket")
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    data_root = args.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    ConditionalBucketHandler.data_root = data_root
    server = ThreadingHTTPServer((args.host, args.port), ConditionalBucketHandler)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
