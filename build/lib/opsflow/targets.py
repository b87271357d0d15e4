"""``module:attribute`` names: how an application, a service or a command is pointed at.

One loader for them all, so each says the same kind of clear error: what was
named, what was found there (or why nothing was), and what to name instead.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from opsflow.errors import ConfigurationError

T = TypeVar("T")


def load_target(target: str, kind: type[T], *, default: str, where: str, hint: str) -> T:
    """The ``kind`` that ``module[:attribute]`` names (``default`` when no attribute).

    Args:
        where: what the error names (a variable, an option, the target itself).
        hint: what to do instead, for the error.

    Raises:
        ConfigurationError: the module or attribute is missing, or holds something else.
    """
    module_name, _, attribute = target.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute or default)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigurationError(
            where, f"names {target!r}, where nothing is found ({err})", hint
        ) from err
    if not isinstance(found, kind):
        raise ConfigurationError(
            where, f"names {target!r}: found {type(found).__name__}, wanted {kind.__name__}", hint
        )
    return found
