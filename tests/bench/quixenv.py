"""A virtualenv of its own for the Quix Streams baseline, built on first use.

Quix Streams 3.28.1 requires confluent-kafka below 2.13 and pydantic 2.13,
older than what opsflow pins (``pip install --dry-run quixstreams==3.28.1`` in
the project's environment would downgrade both), so installing it beside
opsflow would change the very clients the other systems are measured with. The
harness therefore keeps it in a separate environment under the user's cache
directory, made once with this interpreter and reused by later runs, with the
same fastavro as the project so that the hop's Avro work is identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tests.bench.harness import BenchError

QUIXSTREAMS = "quixstreams==3.28.1"


def _home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opsflow-bench" / QUIXSTREAMS.replace("==", "-")


def quix_python() -> Path:
    """The interpreter of the Quix Streams environment, creating it if needed.

    Raises:
        BenchError: the environment could not be built (no network to the package
            index, say); the pip output's end is in the message.
    """
    home = _home()
    python = home / "bin" / "python"
    wanted = [QUIXSTREAMS, f"fastavro=={metadata.version('fastavro')}"]
    ready = home / "installed.txt"
    if python.exists() and ready.exists() and ready.read_text().split() == wanted:
        return python
    print(f"  quix: building its environment ({', '.join(wanted)})", flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(home)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise BenchError(f"onehop: could not build the Quix Streams environment:\n{tail}")
    ready.write_text("\n".join(wanted) + "\n")
    return python


def quix_version(python: Path) -> str:
    """The quixstreams and confluent-kafka versions the environment really holds."""
    code = (
        "from importlib.metadata import version as v;print(v('quixstreams'), v('confluent-kafka'))"
    )
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    quix, kafka = out.stdout.split()
    return f"quixstreams {quix} (confluent-kafka {kafka})"
