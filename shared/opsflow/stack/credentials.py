"""The embedded stack's secrets, and the data directory only its owner may read.

On a machine shared with other users, anyone can connect to a loopback port.
So each data directory gets its own generated secrets, made once by ``opsflow
up`` and kept in ``credentials.json`` (mode 0600) in the data directory (0700):

- PostgreSQL's password (scram-sha-256). Clients find it in ``pgpass``, libpq's
  password file, which ``DATABASE_URL`` names (``?passfile=``): the URL itself
  holds no secret, so it can be shown, logged and copied, and libpq ignores a
  password file that others can read;
- supervisord's control interface password (HTTP basic authentication; its
  configuration holds only the SHA-1 supervisord compares with);
- the object store's secret key, with which the broker signs its S3 requests
  (``opsflow.stack.sigv4``).

A secret is handed only to the process that needs it, in its environment
(which other users cannot read), never on a command line (which they can).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from opsflow.stack.sigv4 import AccessKey

FILE = "credentials.json"
PGPASS = "pgpass"
DATABASE_USER = "postgres"
SUPERVISOR_USER = "opsflow"
# The access key id names the key; only its secret is one.
STORE_KEY_ID = "opsflow"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its missing parents) readable by its owner only.

    An existing directory is tightened too: a data directory made before
    opsflow protected it becomes private at the next ``opsflow up``.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, replacing it whole.

    Created 0600 from the start (not chmod-ed after writing), so there is no
    moment at which another user could open it.
    """
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    partial.replace(path)


@dataclass(frozen=True)
class Credentials:
    """The secrets of one data directory's stack."""

    postgres_password: str
    supervisor_password: str
    store_secret_key: str

    def __repr__(self) -> str:
        return "Credentials(***)"

    @property
    def store_key(self) -> AccessKey:
        return AccessKey(STORE_KEY_ID, self.store_secret_key)

    @classmethod
    def of(cls, data_dir: Path) -> Credentials:
        """The data directory's credentials, generated and saved the first time.

        Also writes the PostgreSQL password file ``DATABASE_URL`` names, if it is missing.
        """
        path, pgpass = data_dir / FILE, data_dir / PGPASS
        try:
            found = cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            private_dir(data_dir)
            found = cls(*(secrets.token_urlsafe(32) for _ in range(3)))
            write_private(path, json.dumps(asdict(found), indent=2))
            pgpass.unlink(missing_ok=True)
        if not pgpass.exists():
            # Any host and port: libpq reads this file only for a URL that names it.
            write_private(pgpass, f"*:*:*:{DATABASE_USER}:{found.postgres_password}\n")
        return found


def database_url(data_dir: Path, host: str, port: int) -> str:
    """The embedded PostgreSQL's URL: the user, and the password file instead of a password."""
    passfile = quote(str(data_dir / PGPASS), safe="/")
    return f"postgresql://{DATABASE_USER}@{host}:{port}/postgres?passfile={passfile}"
