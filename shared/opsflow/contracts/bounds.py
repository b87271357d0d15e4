"""The bounds every contract's values keep, beyond what their Avro types say.

Avro bounds neither a string nor a list, so without more a producer could put a
megabyte in a customer's name, a bell character in an order id or a million
lines in an order: values that break logs, terminals, screens, CSV exports and
database indexes far from where they came in. Every contract therefore keeps:

- a string holds at most ``MAX_TEXT`` characters, unless its field says more
  (``Annotated[str, Field(max_length=N)]``); enforced whenever a model is
  built (pydantic's ``str_max_length``): by ingest (422 naming the field), by
  the producer SDK, and by every consumer decoding a record (a dead letter);
- a string holds no control character but tab, line feed and carriage return;
- a list holds at most ``MAX_ITEMS`` items, unless its field says otherwise.

The last two are checked where events enter, by the producer SDK (and so by
ingest, which writes through it): ``violation`` names the first value out of
bounds. A record on a topic is bounded in size by the broker anyway.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

MAX_TEXT = 1_000
MAX_ITEMS = 1_000
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters (C0, DEL and C1) other than tab, line feed and carriage return."""


def violation(record: BaseModel) -> tuple[str, str] | None:
    """The first value of ``record`` out of bounds, as (dotted field path, what is
    wrong), or None when every value keeps them."""
    for name, info in type(record).model_fields.items():
        # A field's own max_length (pydantic keeps it as metadata) replaces MAX_ITEMS.
        lengths = [getattr(m, "max_length", None) for m in info.metadata]
        limit = next((n for n in lengths if isinstance(n, int)), MAX_ITEMS)
        found = _check(getattr(record, name), name, limit)
        if found is not None:
            return found
    return None


def _check(value: Any, path: str, limit: int) -> tuple[str, str] | None:
    if isinstance(value, str):
        control = CONTROL.search(value)
        if control is not None:
            return path, f"contains the control character U+{ord(control.group()):04X}"
        return None
    if isinstance(value, BaseModel):
        found = violation(value)
        return None if found is None else (f"{path}.{found[0]}", found[1])
    if isinstance(value, list):
        if len(value) > limit:
            return path, f"has {len(value)} items, more than the {limit} allowed"
        for index, item in enumerate(value):
            found = _check(item, f"{path}.{index}", MAX_ITEMS)
            if found is not None:
                return found
    return None
