"""The studio's one door: an ASGI middleware in front of every route and the WebSocket.

A request passes when its Host is one of this server's names (`network.host_headers`; any other Host is DNS
rebinding) and it carries one of the per-run tokens — in the query once (the URL the server printed), then in an
HttpOnly, same-site cookie set on that first response (the token presented last). The token says the request's
role, put in the ASGI scope under `ROLE`: the visitor token (the printed URL, the QR code) or the host token
(host-only routes and controls: recordings, the server's own sources). A WebSocket must also come from this
server's own Origin. Refusals: 401 without a token, 403 with a wrong one, a foreign Host or a visitor on a
host-only route; a WebSocket is refused before its handshake completes (close 1008, which the client sees as 403).
"""

from __future__ import annotations

import secrets
from http.cookies import SimpleCookie
import json
from typing import Any, Callable
from urllib.parse import parse_qs

from starlette.responses import PlainTextResponse

from mlx_sdxs.camera.picker import PUSHED_SOURCES

COOKIE = "mlx_sdxs_token"
#: The ASGI scope key holding the request's role: HOST or VISITOR.
ROLE = "mlx_sdxs.role"
HOST, VISITOR = "host", "visitor"
#: Routes only the host token opens: the recordings (the host's to hand out) and the invitation's QR code.
HOST_ONLY_PATHS = ("/recordings/", "/qr.svg")
HOST_ONLY = "only the host can do that: open the 'host controls' URL the server printed"


class Guard:
    def __init__(self, app: Callable, tokens: dict[str, str], allowed_hosts: set[str]):
        """`tokens`: each token and the role it gives; `allowed_hosts`: the Host headers that name this server."""
        self.app, self.tokens = app, tokens
        self.allowed_hosts = {host.lower() for host in allowed_hosts}

    def resolve(self, headers: dict[str, str], query_token: str | None) -> tuple[str | None, int]:
        """(the request's role, 0), or (None, the HTTP status to refuse it with)."""
        if headers.get("host", "").lower() not in self.allowed_hosts:
            return None, 403
        given = query_token or _cookie(headers.get("cookie", ""))
        if not given:
            return None, 401
        roles = [role for token, role in self.tokens.items() if secrets.compare_digest(given, token)]
        return (roles[0], 0) if roles else (None, 403)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query_token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        role, refused = self.resolve(headers, query_token)
        scope = {**scope, ROLE: role}
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            own = f"{'https' if scope.get('scheme') == 'wss' else 'http'}://{headers.get('host', '')}"
            if refused or (origin is not None and origin.lower() != own.lower()):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if refused:
            text = "token required: open the URL the server printed" if refused == 401 else "forbidden"
            await PlainTextResponse(text, status_code=refused)(scope, receive, send)
            return
        if role != HOST and scope["path"].startswith(HOST_ONLY_PATHS):
            await PlainTextResponse(HOST_ONLY, status_code=403)(scope, receive, send)
            return
        if query_token is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={query_token}; HttpOnly; SameSite=strict; Path=/".encode("latin-1")
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def control_refusal(role: str | None, text: str) -> str | None:
    """Why a WebSocket control from `role` is refused (None: it may proceed). Host only: recording, the number of
    visitors' streams, and switching
    to one of the server's own sources (its camera, a video, the synthetic scene); a page's own webcam and
    canvas are anyone's. A message that is not a control at all is the controls' to count."""
    if role == HOST:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if message.get("type") in ("record", "max_streams") or (message.get("type") == "source"
                                           and message.get("source") not in PUSHED_SOURCES):
        return HOST_ONLY
    return None


def _cookie(header: str) -> str | None:
    cookies = SimpleCookie()
    try:
        cookies.load(header)
    except Exception:  # noqa: BLE001 — a malformed Cookie header is simply no token
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None else None
