"""A secured deployment's edges on loopback: a private CA, and a registry behind TLS.

Managed schema registries (Confluent Cloud's, Redpanda Cloud's) and self-managed
ones behind a load balancer are reached over TLS with basic or bearer
authentication; opsflow's embedded registry speaks plain HTTP with basic
authentication. ``SecuredRegistry`` stands where such a front stands: a real
HTTPS server, its certificate signed by a private CA made at test time, that
checks the credentials of every request and passes the ones it accepts to the
session's registry. It also serves an OAuth token endpoint (the identity
provider's part) issuing the one token it accepts, for the client-credentials
flow.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import trustme


@dataclass(frozen=True)
class Pki:
    """PEM files of a private CA, a loopback server certificate and a client one."""

    ca: Path
    server_chain: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_name: str

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = trustme.CA(organization_name="opsflow tests")
        server = ca.issue_cert("127.0.0.1", "localhost")
        client_name = "ingest.opsflow.test"
        client = ca.issue_cert(client_name, common_name=client_name)
        paths = {
            name: directory / f"{name}.pem"
            for name in ("ca", "server_chain", "server_key", "client_cert", "client_key")
        }
        ca.cert_pem.write_to_path(paths["ca"])
        server.private_key_pem.write_to_path(paths["server_key"])
        for blob in server.cert_chain_pems:
            blob.write_to_path(paths["server_chain"], append=True)
        client.private_key_pem.write_to_path(paths["client_key"])
        client.cert_chain_pems[0].write_to_path(paths["client_cert"])
        return cls(client_name=client_name, **paths)


@dataclass
class SecuredRegistry:
    """The HTTPS front of ``upstream``; ``url`` is what clients are given."""

    url: str
    user_info: str
    static_token: str
    client_id: str
    client_secret: str
    token_url: str
    issued_token: str
    # The subject CN of the client certificate of each request that sent one.
    client_names: list[str] = field(default_factory=list)
    tokens_issued: int = 0


def _basic(user_info: str) -> str:
    return "Basic " + base64.b64encode(user_info.encode()).decode()


@contextmanager
def secured_registry(upstream: str, pki: Pki) -> Iterator[SecuredRegistry]:
    """Serve the HTTPS front on a free loopback port until the block ends."""
    token = secrets.token_urlsafe(16)
    state = SecuredRegistry(
        url="",
        user_info=f"registry-user:{secrets.token_urlsafe(12)}",
        static_token=secrets.token_urlsafe(16),
        client_id="opsflow-tests",
        client_secret=secrets.token_urlsafe(12),
        token_url="",
        issued_token=token,
    )
    accepted = {
        _basic(state.user_info),
        f"Bearer {state.static_token}",
        f"Bearer {state.issued_token}",
    }
    forward = httpx.Client(base_url=upstream, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            if peer:
                subject = dict(pair for rdn in peer["subject"] for pair in rdn)
                state.client_names.append(subject.get("commonName", ""))
            if self.path == "/token":
                self._token(body)
                return
            if self.headers.get("Authorization") not in accepted:
                error = {"error_code": 401, "message": "Unauthorized"}
                self._reply(401, json.dumps(error).encode(), "application/json")
                return
            answer = forward.request(
                self.command,
                self.path,
                content=body,
                headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
            )
            self._reply(answer.status_code, answer.content, answer.headers["content-type"])

        def _token(self, body: bytes) -> None:
            form = parse_qs(body.decode())
            client = _basic(f"{state.client_id}:{state.client_secret}")
            if form.get("grant_type") != ["client_credentials"] or (
                self.headers.get("Authorization") != client
            ):
                self._reply(401, b'{"error": "invalid_client"}', "application/json")
                return
            state.tokens_issued += 1
            issued = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            self._reply(200, json.dumps(issued).encode(), "application/json")

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_chain, pki.server_key)
    context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate is checked when sent
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_port}"
    state.token_url = f"{state.url}/token"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        forward.close()
