"""The usage pages (contract section 11): an organization's usage `GET /orgs/{org}` (a portal
token, or a read key) and the operator overview `GET /` (admin), as HTML for people.

A page takes its credential from `Authorization: Bearer`, from `?token=` (portal tokens
only: short-lived and read-only, so a link or an iframe can carry one; API keys never go in
a URL) or from the cookie `POST /session` sets for someone signing in with a key. The
cookie is read by these GET pages only, never by the API, so it can change nothing.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs
from uuid import UUID

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from metering.api.dependencies import bearer_of, credential
from metering.api.errors import ApiError
from metering.api.state import AppState, state_of
from metering.models import utc_now
from metering.portal.nearest import nearest_limits
from metering.portal.org_page import OrgPageBuilder
from metering.portal.render import FAVICON, STYLESHEET, render
from metering.portal.tokens import PORTAL_SCOPE, TOKEN_PREFIX
from metering.storage.keys import ApiKey

router = APIRouter(include_in_schema=False)
COOKIE = "metering_key"
COOKIE_SECONDS = 8 * 3600


def _headers(state: AppState) -> dict[str, str]:
    frames = " ".join(["'self'", *state.settings.portal_origin_list])
    return {
        "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; "
        f"img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors {frames}",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


def _message(
    state: AppState, status: int, title: str, reason: str, signin: bool, next_path: str
) -> HTMLResponse:
    body = render("message.html", title=title, reason=reason, signin=signin, next=next_path)
    return HTMLResponse(body, status_code=status, headers=_headers(state))


async def _page_key(request: Request) -> ApiKey | None:
    """The credential of this page request (see the module's docstring); None without
    one; ApiError (401) for an unknown, revoked or expired one."""
    presented = bearer_of(request)
    if presented is not None:
        return await credential(request, presented)
    token = request.query_params.get("token")
    if token:
        if not token.startswith(f"{TOKEN_PREFIX}_"):
            raise ApiError(
                401, "key_in_url", "only a portal token goes in a link; sign in with a key"
            )
        return await credential(request, token)
    cookie = request.cookies.get(COOKIE)
    if cookie:
        return await credential(request, cookie)
    return None


@router.get("/orgs/{org_id}", response_class=HTMLResponse)
async def org_page(request: Request, org_id: Annotated[str, Path(max_length=64)]) -> HTMLResponse:
    """An organization's usage: limits, each meter's days this period, crossings."""
    state = state_of(request)
    here = request.url.path
    try:
        org = UUID(org_id)
    except ValueError:
        reason = f"{org_id!r} is not an organization id"
        return _message(state, 404, "No such page", reason, False, here)
    try:
        key = await _page_key(request)
    except ApiError as error:
        return _message(state, error.status, "Not signed in", error.reason, True, here)
    if key is None:
        return _message(
            state, 401, "Sign in", "This page needs a portal token link or a read key.", True, here
        )
    if not (key.allows("read") or PORTAL_SCOPE in key.scopes):
        return _message(state, 403, "Not allowed", "this key cannot read usage", False, here)
    if not key.may_access(org):
        return _message(
            state, 403, "Not allowed", "this credential reads another organization", False, here
        )

    async def build() -> str:
        builder = OrgPageBuilder(state.reads, state.meters, state.meter_usage, state.crossings)
        return render("org.html", page=await builder.build(org, key, utc_now()))

    html = await state.pages.get((org, key.meters), build)
    return HTMLResponse(html, headers=_headers(state))


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> HTMLResponse:
    """The operator overview: ingestion, dead letters, freshness, webhooks, and the
    organizations nearest their limits (admin)."""
    state = state_of(request)
    try:
        key = await _page_key(request)
    except ApiError as error:
        return _message(state, error.status, "Not signed in", error.reason, True, "/")
    if key is None:
        return _message(state, 401, "Sign in", "The overview needs an admin key.", True, "/")
    if not key.allows("admin"):
        return _message(state, 403, "Not allowed", "the overview needs an admin key", True, "/")
    now = utc_now()
    figures = await state.sampler.current()
    nearest = await nearest_limits(state.reads, state.crossings, now)
    body = render("overview.html", f=figures, nearest=nearest, now=now)
    return HTMLResponse(body, headers=_headers(state))


def _safe_next(value: str) -> str:
    """A path on this site only (no `//host` or scheme): where to go after signing in."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


@router.post("/session")
async def sign_in(request: Request) -> Response:
    """Sign in to the pages with an API key (a form post): the key goes into an HttpOnly,
    SameSite=Strict cookie that only the pages read."""
    state = state_of(request)
    form = parse_qs((await request.body()).decode(errors="replace"))
    presented = (form.get("key") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/"])[0])
    try:
        key = await credential(request, presented) if presented else None
    except ApiError as error:
        return _message(state, 401, "Sign in", error.reason, True, target)
    if key is None or PORTAL_SCOPE in key.scopes:
        return _message(state, 401, "Sign in", "send an API key (mk_…)", True, target)
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    response.set_cookie(
        COOKIE,
        presented,
        max_age=COOKIE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )
    return response


@router.post("/session/end")
async def sign_out() -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _asset(body: bytes, media_type: str, seconds: int) -> Response:
    headers = {"Cache-Control": f"public, max-age={seconds}", "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=media_type, headers=headers)


@router.get("/static/pages.css")
async def stylesheet() -> Response:
    return _asset(STYLESHEET, "text/css", 3600)


@router.get("/static/favicon.svg")
async def favicon() -> Response:
    return _asset(FAVICON, "image/svg+xml", 86400)
