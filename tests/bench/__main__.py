"""``python -m tests.bench``: run the benchmarks (all, or ``--only NAME``).

A run starts its own embedded stack, so it needs nothing running and leaves
nothing running; see ``tests/bench/harness.py``.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from tests.bench.codec import CodecCase
from tests.bench.harness import BenchError, Case, run
from tests.bench.onehop import OneHopCase
from tests.bench.rebuild import RebuildCase
from tests.bench.runstack import RunStackCase
from tests.bench.workflow import WorkflowCase

# Every case, in the order a full run takes them.
CASES: dict[str, type[Case]] = {
    case.name: case for case in (CodecCase, OneHopCase, WorkflowCase, RebuildCase, RunStackCase)
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run; the exit code is 0 when figures were produced."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Run opsflow's benchmarks against a temporary embedded stack.",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        help="repetitions per case; the median and min/max are reported (default: "
        + ", ".join(f"{name} {case.default_repeat}" for name, case in CASES.items())
        + ")",
    )
    parser.add_argument(
        "--events",
        type=_positive,
        help="events per case, to shrink a run for a quick check of the machinery; startup "
        "then weighs on the figures (default: each case's own)",
    )
    parser.add_argument("--only", choices=sorted(CASES), help="run only this case")
    parser.add_argument(
        "--use-env",
        action="store_true",
        help="keep KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and SCHEMA_REGISTRY_URL from the "
        "environment (external counterparts) instead of starting embedded ones",
    )
    args = parser.parse_args(argv)
    cases = [CASES[args.only]] if args.only else list(CASES.values())
    command = [sys.executable, "-m", "tests.bench", *(sys.argv[1:] if argv is None else argv)]
    try:
        run(cases, repeat=args.repeat, events=args.events, use_env=args.use_env, command=command)
    except BenchError as err:
        Console(stderr=True).print(f"[red]benchmark failed:[/] {err}", highlight=False)
        return 1
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted; the stack was stopped[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
