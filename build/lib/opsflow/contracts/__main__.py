"""``python -m opsflow.contracts [SCHEMAS_DIR]``: the evolution gate for CI.

Exits 0 when every published schema version may follow its predecessors, 1 with
one line per problem when not, 2 when the schemas cannot be found.
"""

from __future__ import annotations

import sys
from pathlib import Path

from opsflow.contracts.catalogue import schemas_dir
from opsflow.contracts.evolution import REPLAY_LEVEL, check_evolution
from opsflow.errors import OpsflowError


def main(argv: list[str]) -> int:
    """Run the gate on ``argv[0]`` or on ``schemas_dir()``; return the exit status."""
    try:
        directory = Path(argv[0]) if argv else schemas_dir()
        problems = check_evolution(directory)
    except OpsflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"{directory}: every version is {REPLAY_LEVEL} compatible with all earlier ones")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
