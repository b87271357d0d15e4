"""What a service tells browsers about its pages: run no one else's code, and never in a frame.

A service whose origin holds people's sessions (a human step's inbox) must not
run a script it did not write: any script on the origin acts as the signed-in
person (it can read the pages, their CSRF tokens included, and post the forms).
``SecurityHeaders`` puts on every response:

- ``Content-Security-Policy``: the service's own stylesheet and script files,
  and nothing else: no inline script or style, no script from elsewhere, no
  plugin, requests (the inbox's refresh) and forms only back here, ``<base>``
  cannot redirect relative links, and no site may frame the pages
  (``frame-ancestors 'none'``, and ``X-Frame-Options: DENY`` for browsers older
  than CSP 2), so a click cannot be hijacked by an overlay;
- ``X-Content-Type-Options: nosniff``: a JSON answer is never run as a script
  or read as a stylesheet, whatever it contains;
- ``Referrer-Policy: same-origin``: other sites never learn a task's URL; the
  service's own form posts keep their ``Origin``, which the CSRF check reads
  (``no-referrer`` would make a browser send ``Origin: null`` for them).

JSON answers get the same headers: harmless to API clients, and a browser that
opens one directly still runs nothing. The headers are four constant strings,
so they are set here rather than through a package (``secure``): it would add a
dependency and the policy would still be written here.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "style-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "img-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)

_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", PAGE_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP response that does not set
    them itself (``app.add_middleware(SecurityHeaders)``).

    A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: it only
    touches the response's first message, so streaming and background tasks work
    as without it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in _HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
