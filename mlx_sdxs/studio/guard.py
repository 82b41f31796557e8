"""The studio's one door: an ASGI middleware in front of every route and the WebSocket.

A request passes when its Host is this server on a loopback name (a foreign Host is DNS rebinding) and it
carries the per-run token — in the query once (the URL the server printed), then in an HttpOnly,
same-site cookie set on that first response. A WebSocket must also come from this server's own Origin.
Refusals: 401 without a token, 403 with a wrong one or a foreign Host; a WebSocket is refused before its
handshake completes (close 1008, which the client sees as 403).
"""

from __future__ import annotations

import secrets
from http.cookies import SimpleCookie
from typing import Any, Callable
from urllib.parse import parse_qs

from starlette.responses import PlainTextResponse

COOKIE = "mlx_sdxs_token"


class Guard:
    def __init__(self, app: Callable, token: str, allowed_hosts: set[str]):
        self.app, self.token, self.allowed_hosts = app, token, allowed_hosts
        self.allowed_origins = {f"http://{host}" for host in allowed_hosts}

    def refusal(self, headers: dict[str, str], query_token: str | None) -> int:
        """0 when the request may proceed, else the HTTP status to refuse it with."""
        if headers.get("host", "") not in self.allowed_hosts:
            return 403
        given = query_token or _cookie(headers.get("cookie", ""))
        if not given:
            return 401
        return 0 if secrets.compare_digest(given, self.token) else 403

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query_token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        refused = self.refusal(headers, query_token)
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            if refused or (origin is not None and origin not in self.allowed_origins):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if refused:
            text = "token required: open the URL the server printed" if refused == 401 else "forbidden"
            await PlainTextResponse(text, status_code=refused)(scope, receive, send)
            return
        if query_token is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=strict; Path=/".encode("latin-1")
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookie(header: str) -> str | None:
    cookies = SimpleCookie()
    try:
        cookies.load(header)
    except Exception:  # noqa: BLE001 — a malformed Cookie header is simply no token
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None else None
