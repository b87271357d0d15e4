"""Server-rendered pages for signed-in people: templates, sign-in and sign-out, forms, CSRF.

A human step's inbox (``opsflow.nodes.human.inbox``) and the operator console
(``opsflow.console``) are both pages of this kind, and must defend themselves the
same way, so it is written once here:

- a person signs in by pasting their bearer token (``opsflow users create``),
  checked as the APIs check it (``opsflow.users.verify_token``); the server
  starts a session (``opsflow.web.sessions``) and the cookie holds only its id
  (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over https, path = the pages'
  prefix, one cookie name per set of pages), never the token;
- only the roles the pages are for may sign in, and a session is checked
  against them again on every request (server-side: a page hiding a button is
  not a check);
- every change is a POST form that must come from this server's own pages
  (``from_this_origin``) and, once signed in, carry the session's CSRF token;
  GET requests change nothing;
- every value is escaped by the templates (``autoescape``), a misspelt name
  fails the page instead of showing blank (``StrictUndefined``), and the one
  stylesheet is served by the pages themselves, as the service's
  ``Content-Security-Policy`` (``opsflow.web.headers``) requires.

The shared templates (``base.html``, ``sign_in.html``, ``pages.css``) live next
to this module; each set of pages adds its own folder, searched first.

Forms are ``application/x-www-form-urlencoded`` with a field or two, parsed
with the standard library (``urllib.parse``) rather than adding
python-multipart for file uploads no page takes.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from opsflow.users import Role, User, verify_token
from opsflow.web.body import read_limited
from opsflow.web.problems import ProblemError
from opsflow.web.sessions import (
    Session,
    SessionLimits,
    csrf_token_matches,
    end_session,
    from_this_origin,
    resume_session,
    start_session,
)

SHARED_TEMPLATES = Path(__file__).with_name("templates")
FORM_LIMIT = 16 * 1024
SESSION_OVER = (
    "your session has ended (signed out, unused for too long, too old, or your access was "
    "revoked); sign in again"
)
FOREIGN_POST = (
    "this form was not sent from these pages (the browser named no origin, or another one); "
    "open the pages and try again"
)
NO_CSRF_TOKEN = (
    "this form did not carry the token of your session (a page from before you signed in "
    "again, or a form from elsewhere); reload the page and try again"
)


def when(at: datetime | None) -> str:
    """A time as every page shows it (UTC, to the second; blank for none)."""
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else ""


class Pages:
    """One set of signed-in pages under ``prefix`` (see the module docstring).

    Args:
        prefix: where the pages are (``/inbox``, ``/console``); the cookie's path.
        scope: the sessions' scope (``opsflow_sessions.scope``): a session of other
            pages opens nothing here. The cookie is named after it.
        title: shown in every page's header.
        templates: the pages' own templates folder (searched before the shared one).
        limits: how long a session lasts.
        roles: who may sign in and use the pages.
        refusal_page: the template a refused form is answered with (403, with ``error``).
        defaults: what every page of the set may use besides the shared names.
        refresh_header: a header the pages' own script marks its refreshes with: such a
            request does not count as the person's activity.
    """

    def __init__(
        self,
        *,
        prefix: str,
        scope: str,
        title: str,
        templates: Path,
        limits: SessionLimits,
        roles: Collection[Role],
        refusal_page: str,
        defaults: dict[str, Any] | None = None,
        refresh_header: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.scope = scope
        self.cookie = f"opsflow_{scope.replace('-', '_')}_session"
        self.limits = limits
        self.roles = frozenset(roles)
        self.refusal_page = refusal_page
        self.refresh_header = refresh_header
        self.defaults: dict[str, Any] = {
            "prefix": prefix,
            "title": title,
            "user": None,
            "csrf": None,
            "error": None,
            "refresh_s": 0,
            "script": None,
            "role_hint": " or ".join(sorted(self.roles)),
            **(defaults or {}),
        }
        self.templates = Jinja2Templates(
            env=Environment(
                loader=ChoiceLoader(
                    [FileSystemLoader(templates), FileSystemLoader(SHARED_TEMPLATES)]
                ),
                autoescape=True,  # every value on a page comes from events or people
                undefined=StrictUndefined,  # a misspelt name fails the page, not shows blank
            )
        )
        self.templates.env.filters["when"] = when
        self.stylesheet = SHARED_TEMPLATES.joinpath("pages.css").read_text("utf-8")

    # --- rendering -------------------------------------------------------------------------

    def render(self, request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        """Template ``name`` with the shared names, never cached (pages show live state)."""
        response = self.templates.TemplateResponse(
            request, name, {**self.defaults, **context}, status
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    def signed_in_page(
        self, request: Request, session: Session, name: str, *, status: int = 200, **context: Any
    ) -> Response:
        """Template ``name`` for the signed-in person of ``session``."""
        return self.render(
            request, name, status=status, user=session.user, csrf=session.csrf_token, **context
        )

    def sign_in_page(self, request: Request, status: int, message: str | None) -> Response:
        """The sign-in form; with 401 the cookie is dropped (it opens nothing any more)."""
        response = self.render(request, "sign_in.html", status=status, error=message)
        if status == 401:
            response.delete_cookie(self.cookie, path=self.prefix)
        return response

    # --- sessions --------------------------------------------------------------------------

    @staticmethod
    def pool(request: Request) -> ConnectionPool[Any]:
        found: ConnectionPool[Any] = request.app.state.pool
        return found

    def _resume(self, request: Request, session_id: str) -> Session | None:
        touch = self.refresh_header is None or self.refresh_header not in request.headers
        with self.pool(request).connection() as conn:
            return resume_session(
                conn, session_id, scope=self.scope, limits=self.limits, touch=touch
            )

    async def signed_in(self, request: Request) -> Session:
        """The request's live session, of a person these pages are for.

        Raises:
            ProblemError: 401 when there is none or it is over; 403 for another role.
        """
        session_id = request.cookies.get(self.cookie)
        if not session_id:
            raise ProblemError(401, "sign in with your token")
        session = await run_in_threadpool(self._resume, request, session_id)
        if session is None:
            raise ProblemError(401, SESSION_OVER)
        self._check_role(session.user)
        return session

    def _check_role(self, user: User) -> None:
        if user.role not in self.roles:
            raise ProblemError(
                403,
                f"these pages are for the {' and '.join(sorted(self.roles))} role; "
                f"{user.display_name} is a {user.role}",
            )

    def _user_of(self, request: Request, token: str) -> User:
        if not token:
            raise ProblemError(401, "sign in with your token")
        with self.pool(request).connection() as conn:
            user = verify_token(conn, token)
        if user is None:
            raise ProblemError(401, "the token is unknown or revoked")
        return user

    # --- forms -----------------------------------------------------------------------------

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        """The POSTed form's fields (the first value of each)."""
        raw = await read_limited(request, FORM_LIMIT, hint="shorten the text")
        fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def refused_post(self, request: Request) -> Response | None:
        """The 403 for a POST another site's page may have sent; None when it is ours."""
        if from_this_origin(request):
            return None
        return self.render(request, self.refusal_page, status=403, error=FOREIGN_POST)

    async def posted(self, request: Request) -> tuple[Session, dict[str, str]]:
        """The session and form of a POST that comes from these pages with its CSRF token.

        Raises:
            ProblemError: 403 from elsewhere, or without the session's token; 401 with no
                live session (the caller shows the sign-in page).
        """
        if not from_this_origin(request):
            raise ProblemError(403, FOREIGN_POST)
        session = await self.signed_in(request)
        form = await self.form(request)
        if not csrf_token_matches(session, form.get("csrf_token")):
            raise ProblemError(403, NO_CSRF_TOKEN)
        return session, form

    # --- the shared routes -----------------------------------------------------------------

    def add_routes(self, router: APIRouter) -> None:
        """The stylesheet, sign-in and sign-out, on ``router`` (whose prefix is ours)."""
        pages = self

        @router.get("/pages.css")
        async def css() -> Response:
            return Response(pages.stylesheet, media_type="text/css")

        @router.get("/sign-in")
        async def sign_in_form(request: Request) -> Response:
            return pages.sign_in_page(request, 200, None)

        @router.post("/sign-in")
        async def sign_in(request: Request) -> Response:
            # Checked here too: another site must not sign a browser in as someone else.
            if (refusal := pages.refused_post(request)) is not None:
                return refusal
            token = (await pages.form(request)).get("token", "").strip()
            try:
                user = await run_in_threadpool(pages._user_of, request, token)
                pages._check_role(user)
            except ProblemError as err:
                return pages.sign_in_page(request, err.problem.status, err.problem.detail)
            if previous := request.cookies.get(pages.cookie):
                await run_in_threadpool(pages._end, request, previous)
            session_id = await run_in_threadpool(pages._start, request, user)
            response = RedirectResponse(pages.prefix, status_code=303)
            response.set_cookie(
                pages.cookie,
                session_id,
                # The browser forgets it when the server would refuse it anyway.
                max_age=math.ceil(pages.limits.absolute.total_seconds()),
                path=pages.prefix,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response

        @router.post("/sign-out")
        async def sign_out(request: Request) -> Response:
            if (refusal := pages.refused_post(request)) is not None:
                return refusal
            session_id = request.cookies.get(pages.cookie)
            session = (
                await run_in_threadpool(pages._resume, request, session_id) if session_id else None
            )
            if session_id and session is not None:
                if not csrf_token_matches(session, (await pages.form(request)).get("csrf_token")):
                    return pages.signed_in_page(
                        request, session, pages.refusal_page, status=403, error=NO_CSRF_TOKEN
                    )
                await run_in_threadpool(pages._end, request, session_id)
            response = RedirectResponse(f"{pages.prefix}/sign-in", status_code=303)
            response.delete_cookie(
                pages.cookie,
                path=pages.prefix,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response

    def _start(self, request: Request, user: User) -> str:
        with self.pool(request).connection() as conn:
            return start_session(conn, user, scope=self.scope, limits=self.limits)

    def _end(self, request: Request, session_id: str) -> None:
        with self.pool(request).connection() as conn:
            end_session(conn, session_id)
