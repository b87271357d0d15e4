"""The benchmark harness: a stack of its own, repeated cases, and a report that can be compared.

Why it is built this way:

- The stack is started with the real command (``opsflow up --detach``) in a
  temporary data directory, like the test suite does, so what is measured is
  what a user runs, and a developer's own stack (or production variables in
  the shell) cannot leak into the figures unless ``--use-env`` asks for it.
- Every case runs ``--repeat`` times and reports the median (robust to one
  noisy repetition) with min/max, so a reader sees how much to trust a figure.
- Comparisons are ratios computed *within* each repetition (both sides timed
  back to back on the same machine state), not across runs or machines.
- Each run is written to ``tests/bench/results/<UTC timestamp>.json`` with the
  machine, the software versions and the exact command line, because a figure
  without its context cannot be compared with a later one.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

from rich.console import Console
from rich.table import Table

from opsflow.db import redact
from tests.support.stack import OPSFLOW, stack_env

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parents[2]
# The variables that point the stack at production counterparts; only these are
# passed through with --use-env (stack_env strips them, and the port choices).
ADDRESS_VARIABLES = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SCHEMA_REGISTRY_URL")
UP_TIMEOUT_S = 300.0  # opsflow up waits up to 180 s for readiness itself
DOWN_TIMEOUT_S = 120.0
PACKAGES = (
    "opsflow",
    "confluent-kafka",
    "fastavro",
    "pydantic",
    "pydantic-core",
    "rich",
    "faust-streaming",
    "faststream",
    "aiokafka",
)


class BenchError(Exception):
    """The benchmark cannot produce trustworthy figures (stack did not start, results differ)."""


# --- what a case declares and returns --------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One figure a case measures in every repetition.

    Args:
        key: stable name, used in the JSON and by ratios.
        label: what exactly was timed, for the table.
        unit: e.g. ``events/s``; higher is better unless ``lower_is_better``.
        target: the value the figure should reach (at most, if ``lower_is_better``);
            shown beside the median with whether it was met.
    """

    key: str
    label: str
    unit: str = "events/s"
    lower_is_better: bool = False
    target: float | None = None


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two metrics, computed per repetition.

    Computing it inside each repetition cancels what both sides share (a busy
    neighbour, CPU frequency), which a ratio of two medians would not.

    Args:
        percent: show as a percentage (for shares of time) instead of ``1.23x``.
        target: the least the ratio should be (the most, if ``lower_is_better``);
            shown with whether it was met.
    """

    key: str
    label: str
    numerator: str
    denominator: str
    percent: bool = False
    target: float | None = None
    lower_is_better: bool = False


@dataclass(frozen=True)
class StackInfo:
    """Where the benchmark's stack is; ``env`` holds the three address variables.

    ``broker_pid`` is the embedded broker's process (None for an external one), so
    a case can tell what the broker spent, which on one machine competes with
    the code measured.
    """

    env: Mapping[str, str]
    data_dir: Path | None
    external: bool
    broker_pid: int | None = None


class Case(ABC):
    """A benchmark case: declared figures, an untimed ``prepare``, and a timed ``measure``.

    Subclasses set ``name`` (what ``--only`` takes), ``summary``, ``metrics`` and
    ``ratios``. ``prepare`` builds inputs and checks correctness once, so a fast
    but wrong implementation cannot win; ``measure`` returns one value per metric.

    ``default_repeat`` is the repetitions when ``--repeat`` is not given: a case
    whose one repetition takes minutes would otherwise dominate the run.
    ``stack_overrides`` are variables the benchmark stack must be started with
    for the case to run at all (e.g. the broker's storage).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    ratios: ClassVar[tuple[Ratio, ...]] = ()
    default_repeat: ClassVar[int] = 5
    stack_overrides: ClassVar[Mapping[str, str]] = {}

    def __init__(self, stack: StackInfo, *, events: int | None = None) -> None:
        """``events``: how many events to measure on (``--events``); None for the case's own."""
        self.stack = stack

    def params(self) -> dict[str, Any]:
        """Parameters worth recording with the figures (sample sizes, seeds)."""
        return {}

    def notes(self) -> list[str]:
        """What a reader must know to read the figures (a fallback taken, a cap hit)."""
        return []

    def labelled_metrics(self) -> tuple[Metric, ...]:
        """``metrics`` as measured: a case may relabel one after learning, say, which
        guarantee a system really ran with."""
        return self.metrics

    @abstractmethod
    def prepare(self) -> None:
        """Build inputs, warm caches and verify correctness; not timed."""

    @abstractmethod
    def measure(self, repetition: int) -> dict[str, float]:
        """One repetition: a value for every declared metric."""

    def close(self) -> None:  # noqa: B027 (an optional hook, deliberately not abstract)
        """Release what ``prepare`` acquired (clients, connections)."""


Work = tuple[str, Callable[[Any], object], Sequence[Any]]
"""A figure to measure: its metric key, a call taking one item, and the items."""

CHUNK = 1_000


def interleaved_rates(plan: Sequence[Work], chunk: int = CHUNK) -> dict[str, float]:
    """Items per second of each piece of work, timed in interleaved chunks.

    Timing each piece in one block would let a change of machine state between
    blocks (a neighbour's build, CPU frequency) land on one side of a
    comparison only. Instead every piece processes ``chunk`` items in turn,
    round after round (in reverse order every other round), and its times are
    summed, so each side samples the same moments.

    The garbage left by the previous chunk is collected before each one so it
    is not billed to the next piece; the collector stays enabled while timing,
    since services run with it and allocation-heavy code pays for it.
    """
    elapsed = {key: 0.0 for key, _, _ in plan}
    longest = max(len(items) for _, _, items in plan)
    for round_, start in enumerate(range(0, longest, chunk)):
        for key, work, items in plan if round_ % 2 == 0 else reversed(plan):
            part = items[start : start + chunk]
            if not part:
                continue
            gc.collect()
            began = time.perf_counter()
            for item in part:
                work(item)
            elapsed[key] += time.perf_counter() - began
    return {key: len(items) / elapsed[key] for key, _, items in plan}


# --- summaries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over the repetitions."""

    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repetitions were."""
        return (self.max - self.min) / self.median if self.median else 0.0


@dataclass
class CaseResult:
    """Everything one case produced, as it goes into the table and the JSON."""

    case: type[Case]
    params: dict[str, Any]
    repeat: int
    declared: tuple[Metric, ...] = ()
    metrics: dict[str, Summary] = field(default_factory=dict)
    ratios: dict[str, Summary] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.case.summary,
            "params": self.params,
            "repeat": self.repeat,
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
            "metrics": {
                m.key: {
                    "label": m.label,
                    "unit": m.unit,
                    "target": m.target,
                    **asdict(self.metrics[m.key]),
                }
                for m in self.declared
            },
            "ratios": {
                r.key: {
                    "label": r.label,
                    "numerator": r.numerator,
                    "denominator": r.denominator,
                    "target": r.target,
                    "lower_is_better": r.lower_is_better,
                    **asdict(self.ratios[r.key]),
                }
                for r in self.case.ratios
            },
        }


def run_case(case: Case, repeat: int, console: Console) -> CaseResult:
    """Prepare the case, then measure it ``repeat`` times and summarise."""
    started = time.perf_counter()
    console.print(f"[bold]{case.name}[/]: preparing ({case.summary})")
    case.prepare()
    # The case's inputs live for the whole run; freezing them keeps every full
    # collection from re-scanning them, which a service (holding far less
    # live data) would not pay either.
    gc.collect()
    gc.freeze()
    runs: list[dict[str, float]] = []
    try:
        for repetition in range(repeat):
            figures = case.measure(repetition)
            missing = {m.key for m in case.metrics} - figures.keys()
            if missing:
                raise BenchError(f"{case.name} did not report {', '.join(sorted(missing))}")
            runs.append(figures)
            console.print(f"  repetition {repetition + 1}/{repeat} done")
    finally:
        gc.unfreeze()
        case.close()
    result = CaseResult(
        type(case),
        case.params(),
        repeat,
        declared=case.labelled_metrics(),
        seconds=time.perf_counter() - started,
        notes=case.notes(),
    )
    for metric in case.metrics:
        result.metrics[metric.key] = Summary.of([run[metric.key] for run in runs])
    for ratio in case.ratios:
        result.ratios[ratio.key] = Summary.of(
            [run[ratio.numerator] / run[ratio.denominator] for run in runs]
        )
    return result


# --- the stack -------------------------------------------------------------------------


def _opsflow(
    env: Mapping[str, str], *args: str, timeout: float, own_session: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPSFLOW, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # In its own session, a Ctrl-C typed while it runs does not reach it.
        start_new_session=own_session,
    )


def _log_tails(data_dir: Path, lines: int = 15) -> str:
    """The end of every component log: the data directory is deleted on exit, so the
    error message is the only place a failed start can be diagnosed from."""
    tails = []
    for log in sorted((data_dir / "logs").glob("*.log")):
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


@contextmanager
def _interrupts_deferred(console: Console) -> Iterator[None]:
    """Let ``opsflow down`` finish even if Ctrl-C is pressed (or SIGTERM sent) meanwhile:
    an interrupted ``down`` would leave the stack's processes running."""

    def note(_signum: int, _frame: FrameType | None) -> None:
        console.print("[yellow]Stopping the benchmark stack; please wait.[/]")

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def benchmark_stack(
    use_env: bool, console: Console, overrides: Mapping[str, str] | None = None
) -> Iterator[StackInfo]:
    """Start a stack in a temporary data directory; always stop it on the way out.

    Args:
        use_env: keep KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and SCHEMA_REGISTRY_URL
            from the caller's environment (external counterparts), instead of
            starting embedded ones.
        overrides: stack variables the cases need (see ``Case.stack_overrides``).
    """
    with tempfile.TemporaryDirectory(prefix="opsflow-bench-", ignore_cleanup_errors=True) as tmp:
        data_dir = Path(tmp) / "data"
        env = stack_env(data_dir, **(overrides or {}))
        if use_env:
            env.update({k: os.environ[k] for k in ADDRESS_VARIABLES if k in os.environ})
        try:
            shown = " ".join(f"{k}={v}" for k, v in (overrides or {}).items())
            console.print(f"Starting the benchmark stack in {data_dir} {shown}".rstrip())
            started = time.perf_counter()
            up = _opsflow(env, "up", "--detach", timeout=UP_TIMEOUT_S)
            if up.returncode != 0:
                raise BenchError(
                    f"`opsflow up --detach` exited {up.returncode}\n{up.stdout}{up.stderr}\n"
                    f"{_log_tails(data_dir)}"
                )
            status = _opsflow(env, "status", "--json", timeout=60)
            try:
                report = json.loads(status.stdout)
            except json.JSONDecodeError as err:
                raise BenchError(
                    f"`opsflow status --json` printed no JSON: {status.stderr}"
                ) from err
            unhealthy = [c["name"] for c in report["components"] if not c["healthy"]]
            if unhealthy:
                raise BenchError(f"unhealthy after `opsflow up`: {', '.join(unhealthy)}")
            addresses = {k: report["env"][k] for k in ADDRESS_VARIABLES}
            console.print(f"Stack ready in {time.perf_counter() - started:.1f}s")
            broker = [
                c.get("pid")
                for c in report["components"]
                if c["name"] == "broker" and "KAFKA_BOOTSTRAP_SERVERS" not in env
            ]
            yield StackInfo(
                env=addresses,
                data_dir=data_dir,
                external=use_env,
                broker_pid=broker[0] if broker and broker[0] else None,
            )
        finally:
            with _interrupts_deferred(console):
                down = _opsflow(env, "down", timeout=DOWN_TIMEOUT_S, own_session=True)
            if down.returncode != 0:
                console.print(f"[red]`opsflow down` exited {down.returncode}:[/] {down.stderr}")


# --- facts and report ------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_facts() -> dict[str, Any]:
    """What a figure depends on besides the code: hardware, OS, interpreter, load."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
    }


def software_facts() -> dict[str, Any]:
    """Versions of what is measured, and the commit (with whether the tree was dirty)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain")
    return {
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def _fmt(value: float, unit: str) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3g}"


def _fmt_ratio(value: float, percent: bool) -> str:
    return f"{value:.0%}" if percent else f"{value:.2f}x"


def _verdict(median: float, target: float | None, at_most: bool, shown: str) -> str:
    """``>= 0.50x met`` or ``<= 150 MISSED``; empty without a target."""
    if target is None:
        return ""
    met = median <= target if at_most else median >= target
    return f"{'<=' if at_most else '>='} {shown} " + ("[green]met[/]" if met else "[red]MISSED[/]")


def results_table(results: Sequence[CaseResult]) -> Table:
    """Figures first, then the ratios of each case (marked by a section line)."""
    table = Table(title="opsflow benchmarks (median of each case's runs, min..max, spread)")
    for column, justify in (
        ("case", "left"),
        ("figure", "left"),
        ("median", "right"),
        ("min .. max", "right"),
        ("spread", "right"),
        ("unit", "left"),
        ("target", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for result in results:
        name = f"{result.case.name} ({result.repeat} run{'s' if result.repeat > 1 else ''})"
        for metric in result.declared:
            s = result.metrics[metric.key]
            table.add_row(
                name,
                metric.label,
                _fmt(s.median, metric.unit),
                f"{_fmt(s.min, metric.unit)} .. {_fmt(s.max, metric.unit)}",
                f"{s.spread:.0%}",
                metric.unit,
                _verdict(
                    s.median,
                    metric.target,
                    metric.lower_is_better,
                    _fmt(metric.target or 0.0, metric.unit),
                ),
            )
            name = ""
        table.add_section()
        for ratio in result.case.ratios:
            s = result.ratios[ratio.key]
            table.add_row(
                "",
                ratio.label,
                f"[bold]{_fmt_ratio(s.median, ratio.percent)}[/]",
                f"{_fmt_ratio(s.min, ratio.percent)} .. {_fmt_ratio(s.max, ratio.percent)}",
                f"{s.spread:.0%}",
                "% of time" if ratio.percent else "x",
                _verdict(
                    s.median,
                    ratio.target,
                    ratio.lower_is_better,
                    _fmt_ratio(ratio.target or 0.0, ratio.percent),
                ),
            )
        table.add_section()
    return table


def _stack_overrides(cases: Sequence[type[Case]]) -> dict[str, str]:
    """The union of the cases' ``stack_overrides``; two cases wanting different values fail."""
    merged: dict[str, str] = {}
    for case in cases:
        for key, value in case.stack_overrides.items():
            if merged.setdefault(key, value) != value:
                raise BenchError(f"cases need different {key} ({merged[key]}, {value}): run apart")
    return merged


def _portable(command: Sequence[str]) -> list[str]:
    """``command`` with its interpreter relative to the checkout (else its file name)."""
    if not command:
        return []
    interpreter = Path(command[0])
    try:
        shown = str(interpreter.relative_to(Path.cwd()))
    except ValueError:
        shown = ".venv/bin/python" if interpreter.parent.name == "bin" else interpreter.name
    return [shown, *command[1:]]


def _shown_address(value: str, data_dir: Path | None) -> str:
    """An address as the results file shows it: no password, and no path of this machine
    (the embedded database's URL names a password file in the temporary data directory)."""
    shown = redact(value)
    return shown.replace(str(data_dir), "<data dir>") if data_dir is not None else shown


def write_results(document: dict[str, Any], started: datetime) -> Path:
    """Write ``results/<UTC timestamp>.json``, never overwriting an earlier run's file."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    gitignore = RESULTS_DIR / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(
            "# Results are per machine and per run; keep them out of git.\n*.json\n"
        )
    stem = started.strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stem}.json"
    n = 1
    while path.exists():
        path = RESULTS_DIR / f"{stem}-{n}.json"
        n += 1
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


# --- the run ---------------------------------------------------------------------------


def _terminate_as_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the stack is stopped on the way out."""
    raise KeyboardInterrupt


def run(
    cases: Sequence[type[Case]],
    *,
    repeat: int | None,
    events: int | None,
    use_env: bool,
    command: Sequence[str],
) -> Path:
    """Run ``cases`` against a fresh stack, print the table and write the JSON.

    Args:
        repeat: repetitions of every case; None for each case's ``default_repeat``.
        events: events per case; None for each case's own number.

    Returns:
        The path of the results file.
    """
    # Piped or under make, Rich would assume 80 columns and wrap the table.
    console = Console(width=None if sys.stdout.isatty() else 132)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    machine = machine_facts()
    results: list[CaseResult] = []
    with benchmark_stack(use_env, console, _stack_overrides(cases)) as stack:
        for case_type in cases:
            results.append(
                run_case(
                    case_type(stack, events=events), repeat or case_type.default_repeat, console
                )
            )
    console.print(results_table(results))
    for result in results:
        for note in result.notes:
            console.print(f"[dim]{result.case.name}:[/] {note}", highlight=False)
    document = {
        "started_at": started.isoformat(),
        "seconds": round(time.perf_counter() - clock, 2),
        # Run from the checkout: the interpreter as the README names it, and no path
        # of the machine the figures were measured on.
        "command": _portable(command),
        "command_line": shlex.join(_portable(command)),
        "repeat": repeat,
        "events": events,
        "machine": machine,
        "software": software_facts(),
        "stack": {
            "external": stack.external,
            "env": {k: _shown_address(v, stack.data_dir) for k, v in stack.env.items()},
            "overrides": _stack_overrides(cases),
        },
        "cases": {result.case.name: result.to_json() for result in results},
    }
    path = write_results(document, started)
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    console.print(f"Wrote {shown} ({document['seconds']:.0f}s in all)", highlight=False)
    console.print(f"Reproduce: {document['command_line']}", highlight=False, soft_wrap=True)
    return path
