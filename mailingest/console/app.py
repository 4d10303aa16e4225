"""The console's web application (Starlette): routes, the door, the actions.

Every route but ``/healthz`` asks :class:`~mailingest.console.access.Gate` who is
there. Pages are rendered on the server and read without JavaScript; htmx (shipped in
``static/``) refreshes the live parts. An action is a form on a confirmation page: it
carries the CSRF token and a nonce, is allowed to operators only, runs through
:mod:`mailingest.application.actions`, is written to the audit log and, sent twice,
answers with the first outcome.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import redis
import redis.lock
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailingest.adapters import keys
from mailingest.adapters.ledger import Ledger
from mailingest.adapters.ledger.base import ACTOR
from mailingest.adapters.senders import check_entity
from mailingest.application import actions
from mailingest.application.services import Context
from mailingest.console import views
from mailingest.console.access import (
    SECURITY_HEADERS,
    SESSION_COOKIE,
    Gate,
    Person,
    Refused,
    new_session,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
DONE_KEPT_S = 24 * 3600  # an action's outcome answers a second send of its form this long
ACTIONS = ("replay", "mark_handled", "map", "poll")
RUNNING = "running"  # what a form's key holds while its action runs
LOCK_WAIT_S = 10  # an action waits this long for another on the same mail, then says so
RUNNING_KEPT_S = 300  # a console that died mid-action frees the form after this


class Busy(Exception):
    """Another action holds the mail: this one has not begun."""


class SecurityHeaders:
    """Adds the console's security headers to every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """The application's state: the workers' context, the door, the templates."""

    def __init__(self, ctx: Context, gate: Gate) -> None:
        self.ctx = ctx
        self.gate = gate
        self.ledger: Ledger = ctx.ledger
        self.health_client = redis.Redis.from_url(
            ctx.services.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        self.health_limiter = anyio.CapacityLimiter(2)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["q"] = lambda value: quote(str(value), safe="")
        self.templates.globals.update(
            when=views.when, ago=views.ago, size=views.size, idle_text=views.idle_text
        )

    # -- the door -------------------------------------------------------------------

    def guarded(
        self, handler: Callable[[Request, Person, str], Response], *, act: bool = False
    ) -> Callable[[Request], Response]:
        """A sync route (Starlette runs it in its thread pool) behind the door: the
        person, and the session cookie (made on the first visit)."""

        def route(request: Request) -> Response:
            address = request.client.host if request.client else "?"
            session = request.cookies.get(SESSION_COOKIE, "")
            fresh = not session
            if fresh:
                session = new_session()
            try:
                person = self.gate.person(request.headers, address, session)
            except Refused as refused:
                headers = {}
                if refused.status == 401 and not self.gate.trusted_header:
                    headers["WWW-Authenticate"] = (
                        'Basic realm="mailingest console", charset="UTF-8"'
                    )
                return PlainTextResponse(refused.text, status_code=refused.status, headers=headers)
            if act and not person.may_act:
                return self.refused(
                    request, person, "", 403, "your role is viewer: only an operator may do this"
                )
            response = handler(request, person, session)
            if fresh:
                response.set_cookie(
                    SESSION_COOKIE,
                    session,
                    httponly=True,
                    secure=_secure(request),
                    samesite="strict",
                )
            return response

        return route

    def page(
        self,
        request: Request,
        name: str,
        person: Person,
        session: str,
        *,
        status: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        template = self.templates.get_template(name)
        body = template.render(
            person=person,
            csrf=self.gate.csrf_token(session, person) if session else "",
            path=request.url.path,
            **values,
        )
        return HTMLResponse(body, status_code=status)

    def refused(
        self, request: Request, person: Person, session: str, status: int, why: str
    ) -> HTMLResponse:
        """The page that says why something was not done."""
        return self.page(request, "refused.html", person, session, status=status, why=why)

    # -- pages ----------------------------------------------------------------------

    def inboxes(self, request: Request, person: Person, session: str) -> Response:
        return self.page(
            request,
            "inboxes.html",
            person,
            session,
            view=views.overview(self.ledger, self.ctx.settings),
        )

    def live(self, request: Request, person: Person, session: str) -> Response:
        """The counts and the inbox table alone (htmx swaps them in): one round trip."""
        return self.page(
            request,
            "live.html",
            person,
            session,
            view=views.overview(self.ledger, self.ctx.settings),
        )

    def mails(self, request: Request, person: Person, session: str) -> Response:
        names = [inbox.name for inbox in self.ctx.settings.inboxes]
        filters = views.parse_filters(request.query_params, names)
        now = self.ledger.now()
        return self.page(
            request,
            "mails.html",
            person,
            session,
            now=now,
            inboxes=names,
            view=views.mail_list(self.ledger, self.ctx.settings, filters, now),
            ages=list(views.AGES),
            lists=list(views.LISTS),
        )

    def mail(self, request: Request, person: Person, session: str) -> Response:
        mail_id = request.query_params.get("id", "")
        view = views.mail_view(self.ledger, mail_id) if mail_id else None
        if view is None:
            return self.refused(request, person, session, 404, "no such mail in the ledger")
        return self.page(request, "mail.html", person, session, view=view, now=self.ledger.now())

    def search(self, request: Request, person: Person, session: str) -> Response:
        query = request.query_params.get("q", "").strip()[:512]
        found = self.ledger.find(query) if query else []
        return self.page(
            request, "search.html", person, session, query=query, found=found, now=self.ledger.now()
        )

    def audit(self, request: Request, person: Person, session: str) -> Response:
        return self.page(
            request,
            "audit.html",
            person,
            session,
            entries=self.ledger.audit_log(limit=200),
            now=self.ledger.now(),
        )

    # -- actions --------------------------------------------------------------------

    def confirm(self, request: Request, person: Person, session: str) -> Response:
        """The page that asks "are you sure?": what will happen, and the form that does it."""
        q = request.query_params
        action = q.get("action", "")
        if action not in ACTIONS:
            return self.refused(request, person, session, 400, "no such action")
        mail_id, inbox, entity = q.get("mail", ""), q.get("inbox", ""), q.get("entity", "")
        record = self.ledger.mail(mail_id) if mail_id else None
        problem, current = "", ""
        affected: list[str] = []
        if action == "poll":
            if inbox not in {i.name for i in self.ctx.settings.inboxes}:
                problem = "no such inbox"
        elif record is None:
            problem = "no such mail in the ledger"
        elif action == "map":
            problem = actions.map_problem(record, entity)
            if not problem:
                entity = check_entity(entity)
                affected = actions.sender_mails(self.ctx, record.sender)
                current = actions.mapped_to(self.ctx.redis, record.sender)
        subject = _subject(action, mail_id, inbox, entity)
        return self.page(
            request,
            "confirm.html",
            person,
            session,
            action=action,
            record=record,
            inbox=inbox,
            entity=entity,
            current=current,
            problem=problem,
            affected=affected,
            nonce=self.gate.nonce(person, action, subject),
            status=400 if problem else 200,
        )

    def act(self, request: Request, person: Person, session: str) -> Response:
        form = _form(request)
        refused = self._refusal(request, person, session, form)
        if refused is not None:
            return refused
        action, nonce = form["action"], form["nonce"]
        done_key = keys.console_done(nonce)
        if not self.ledger.redis.set(done_key, RUNNING, nx=True, ex=RUNNING_KEPT_S):
            earlier = _earlier(self.ledger.redis, done_key)
            return self.page(request, "done.html", person, session, again=True, **earlier)
        token = ACTOR.set(person.actor)
        try:
            outcome = self._carry_out(action, form, person)
        except Busy:
            self.ledger.redis.delete(done_key)  # not begun: the same form may be sent again
            return self.refused(
                request,
                person,
                session,
                409,
                "another operator is acting on this mail: send the form again in a moment",
            )
        except Exception as exc:
            self.ledger.redis.delete(done_key)  # sent again, it runs again (each is safe)
            log.exception("console: %s by %s failed", action, person.name)
            target = form.get("mail") or f"inbox:{form.get('inbox', '')}"
            self.ledger.audit(target, person.name, action, f"failed: {type(exc).__name__}")
            return self.refused(
                request,
                person,
                session,
                500,
                "the action failed part way; what was done is in the audit log, and the "
                "sweep takes up a mail left queued. See the console's log.",
            )
        finally:
            ACTOR.reset(token)
        self.ledger.redis.set(done_key, json.dumps(outcome), ex=DONE_KEPT_S)
        return self.page(request, "done.html", person, session, again=False, **outcome)

    def _refusal(
        self, request: Request, person: Person, session: str, form: dict[str, str]
    ) -> Response | None:
        """Why this form is not carried out (None: it is)."""
        if SESSION_COOKIE not in request.cookies:
            return self.refused(
                request,
                person,
                session,
                403,
                "your browser sent no session cookie: serve the console over HTTPS (it marks "
                "its cookie Secure), then open the page again",
            )
        if not self.gate.csrf_ok(session, person, form.get("csrf", "")) or not _same_origin(
            request
        ):
            log.warning("console: %s sent an action without a valid CSRF token", person.name)
            return self.refused(
                request,
                person,
                session,
                403,
                "the form's token is missing or stale: open the page again",
            )
        action = form.get("action", "")
        subject = _subject(
            action, form.get("mail", ""), form.get("inbox", ""), form.get("entity", "")
        )
        if action not in ACTIONS or not self.gate.nonce_ok(
            form.get("nonce", ""), person, action, subject
        ):
            return self.refused(
                request,
                person,
                session,
                400,
                "this form was not made by the console for you: open the page again",
            )
        return None

    def _carry_out(self, action: str, form: dict[str, str], person: Person) -> dict[str, Any]:
        """The action, each outcome audited as soon as it is known."""
        run = actions.to_workers(self.ctx)
        mail_id = form.get("mail", "")
        if action == "poll":
            inbox = form.get("inbox", "")
            try:
                outcome = actions.poll_now(self.ctx, inbox)
            except Exception as exc:  # noqa: BLE001 - an unknown inbox, a broker down
                outcome = actions.Outcome("", False, f"not queued: {type(exc).__name__}")
            self.ledger.audit(f"inbox:{inbox}", person.name, "poll now", outcome.text)
            return {"title": f"Poll of {inbox}", "outcomes": [_shown(outcome)], "back": "/"}
        entity = form.get("entity", "")
        what = {
            "replay": "replay",
            "mark_handled": "mark handled",
            "map": f"map sender to {entity}",
        }[action]

        def audited(outcome: actions.Outcome) -> actions.Outcome:
            self.ledger.audit(outcome.mail_id or mail_id, person.name, what, outcome.text)
            return outcome

        # two operators, one mail: one after the other (held while the form's key says
        # running; a release after that is not an error: the work is done)
        lock = self.ledger.step_lock(f"console:{mail_id}", timeout=RUNNING_KEPT_S)
        if not lock.acquire(blocking_timeout=LOCK_WAIT_S):
            raise Busy(mail_id)
        try:
            if action == "replay":
                outcomes = [audited(actions.replay(self.ctx, mail_id, run))]
            elif action == "mark_handled":
                outcomes = [audited(actions.mark_handled(self.ctx, mail_id))]
            else:
                outcomes = actions.map_sender_of(self.ctx, mail_id, entity, run, audited)
        finally:
            with suppress(redis.exceptions.LockError):
                lock.release()
        return {
            "title": what[0].upper() + what[1:],
            "outcomes": [_shown(o) for o in outcomes],
            "back": f"/mail?id={quote(mail_id, safe='')}",
        }

    # -- health ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Redis answers within 2 s: a thread and a client of its own, so neither busy
        pages nor a Redis that hangs hold the event loop or the probe."""
        limiter = self.health_limiter
        if limiter.borrowed_tokens >= limiter.total_tokens:  # the probes before still wait
            return PlainTextResponse("redis slow to answer", status_code=503)
        try:
            await anyio.to_thread.run_sync(self.health_client.ping, limiter=limiter)
        except redis.RedisError:
            return PlainTextResponse("redis unavailable", status_code=503)
        return PlainTextResponse("ok")

    def routes(self) -> list[Route | Mount]:
        g = self.guarded
        return [
            Route("/healthz", self.health),
            Route("/", g(self.inboxes)),
            Route("/live", g(self.live)),
            Route("/mails", g(self.mails)),
            Route("/mail", g(self.mail)),
            Route("/search", g(self.search)),
            Route("/audit", g(self.audit)),
            Route("/confirm", g(self.confirm, act=True)),
            Route("/act", g(self.act, act=True), methods=["POST"]),
            Route("/static/{path:path}", g(self.static)),
        ]

    def static(self, request: Request, person: Person, session: str) -> Response:
        return _STATIC.get(request.path_params["path"]) or PlainTextResponse(
            "not found", status_code=404
        )


def _load_static() -> dict[str, Response]:
    files = {"htmx.min.js": "text/javascript", "console.css": "text/css"}
    return {
        name: Response(
            (HERE / "static" / name).read_bytes(),
            media_type=kind,
            headers={"Cache-Control": "private, max-age=3600"},
        )
        for name, kind in files.items()
    }


_STATIC = _load_static()


def _secure(request: Request) -> bool:
    """Whether the session cookie is marked Secure: always, but for plain HTTP to a
    loopback address (the demo, the tests), where browsers would drop a Secure cookie
    set over HTTP. Behind a TLS proxy the scheme is its X-Forwarded-Proto (uvicorn's
    proxy headers, trusted from FORWARDED_ALLOW_IPS)."""
    host = (request.url.hostname or "").strip("[]")
    return request.url.scheme == "https" or host not in ("127.0.0.1", "localhost", "::1")


def _shown(outcome: actions.Outcome) -> dict[str, Any]:
    return {"mail_id": outcome.mail_id, "ok": outcome.ok, "text": outcome.text}


def _form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (read in this thread: the route is sync)."""
    import anyio.from_thread

    async def read() -> dict[str, str]:
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}

    return anyio.from_thread.run(read)


def _same_origin(request: Request) -> bool:
    """The browser says the form came from the console's own pages. Under the console's
    no-referrer policy Chromium sends ``Origin: null`` with a form, so its
    ``Sec-Fetch-Site`` decides; a real Origin must be the console's; a client that
    sends neither (not a browser) is judged by the CSRF token alone."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return origin.split("://", 1)[-1] == request.headers.get("host", "")


def _earlier(client: redis.Redis, key: str) -> dict[str, Any]:
    """What the first send of a form did; if it is still running, a moment's wait (at
    most 3 s, then it says so: no thread is held longer)."""
    for _ in range(30):
        value = keys.as_text(client.get(key) or b"")
        if value and value != RUNNING:
            with suppress(ValueError):
                data: dict[str, Any] = json.loads(value)
                return data
        if not value:  # the first send failed (its key released): not done
            return {
                "title": "Not done",
                "outcomes": [],
                "back": "/",
                "note": "the first send of this form failed (see the audit log): open the "
                "page again and send a new form",
            }
        time.sleep(0.1)
    return {
        "title": "Still running",
        "outcomes": [],
        "back": "/",
        "note": "this form was sent before and is still being carried out: reload in a moment",
    }


def _subject(action: str, mail_id: str, inbox: str, entity: str) -> str:
    """What a form's nonce is signed over besides its action and sender."""
    return inbox if action == "poll" else f"{mail_id}\0{entity}" if action == "map" else mail_id


def build_app(ctx: Context, gate: Gate) -> Starlette:
    console = Console(ctx, gate)
    app = Starlette(routes=console.routes())
    app.add_middleware(SecurityHeaders)
    app.state.console = console
    return app
