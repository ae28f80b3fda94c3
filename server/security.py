"""Request hardening, stricter than ComfyUI's (docs/comfyui-reference.md#request-hardening).

* Host allow-list (DNS rebinding): loopback names, IP literals, the machine's own name and configured names.
* Origin check on every state-changing request and on the websocket, whatever the bind address: a browser
  request whose Origin (or Sec-Fetch-Site) says it comes from another site is refused.
* Bearer token (`--auth-token`): `Authorization: Bearer T`, or the cookie set by opening `/?token=T` once, so
  the editor and its websocket work too.
* Body size limit (413), `X-Content-Type-Options: nosniff` and frame/referrer headers on every response.
* Path confinement by realpath for files named by clients (no `..`, no absolute paths, no symlink escape).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.exceptions import HTTPException

TOKEN_COOKIE = "latentloom_token"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Served inline by /view; anything else is sent as an attachment of type application/octet-stream (so an
# uploaded SVG, HTML or JS file can never run in the server's origin).
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/avif",
                          "image/x-portable-pixmap", "image/tiff", "video/mp4", "video/webm", "audio/mpeg",
                          "audio/wav", "audio/x-wav", "audio/ogg", "audio/flac", "text/plain"})


class BodyTooLarge(Exception):
    pass


def split_host(value: str) -> tuple[str, str | None]:
    """'Host' header value -> (lower-case name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class SecurityPolicy:
    def __init__(self, auth_token: str | None = None, allowed_hosts: tuple[str, ...] = (),
                 max_body_bytes: int = 100 * 1024 * 1024):
        self.auth_token = auth_token or None
        names = {h.strip().lower() for h in allowed_hosts if h.strip()}
        try:
            hostname = socket.gethostname().lower()
            names |= {hostname, f"{hostname}.local"}
        except OSError:
            pass
        self.allowed_hosts = frozenset(names | LOOPBACK_NAMES)
        self.max_body_bytes = max_body_bytes

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return True  # HTTP/1.0 clients without Host cannot be a rebinding browser
        name, _ = split_host(host)
        return name in self.allowed_hosts or is_ip_literal(name)

    def origin_allowed(self, headers: dict[str, str]) -> bool:
        """A browser tells us where a request comes from; only our own origin may change state."""
        origin = headers.get("origin")
        host = headers.get("host", "")
        if origin is not None:
            if origin == "null":
                return False
            parts = urlsplit(origin)
            if not parts.hostname:
                return False
            origin_host = parts.hostname.lower()
            origin_port = str(parts.port) if parts.port else None
            host_name, host_port = split_host(host)
            if origin_host != host_name:
                return False
            default = {"http": "80", "https": "443", "ws": "80", "wss": "443"}.get(parts.scheme)
            return (origin_port or default) == (host_port or default)
        # No Origin: a non-browser client, unless Fetch Metadata says it is a cross-site browser request.
        return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    def token_ok(self, headers: dict[str, str], query: dict[str, list[str]]) -> bool:
        if self.auth_token is None:
            return True
        candidates = []
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            candidates.append(authorization[7:].strip())
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            pass
        if TOKEN_COOKIE in cookie:
            candidates.append(cookie[TOKEN_COOKIE].value)
        candidates.extend(query.get("token", []))
        expected = self.auth_token.encode()
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN"),
                    (b"referrer-policy", b"same-origin")]


class SecurityMiddleware:
    """Pure ASGI, so it covers the websocket handshake as well as HTTP."""

    def __init__(self, app, policy: SecurityPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        policy = self.policy
        if not policy.host_allowed(headers.get("host")):
            return await self._refuse(scope, receive, send, 403, "host not allowed")
        if (scope["type"] == "websocket" or scope["method"] in STATE_CHANGING) and not policy.origin_allowed(headers):
            return await self._refuse(scope, receive, send, 403, "cross-origin request refused")
        if not policy.token_ok(headers, query):
            return await self._refuse(scope, receive, send, 401, "missing or wrong bearer token")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if policy.auth_token and query.get("token") and scope["method"] == "GET" and scope["path"] == "/":
            if not policy.token_ok({}, query):
                return await self._refuse(scope, receive, send, 401, "wrong token")
            return await self._set_cookie(send)

        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > policy.max_body_bytes
            except ValueError:
                return await self._refuse(scope, receive, send, 400, "bad Content-Length")
            if too_big:
                return await self._refuse(scope, receive, send, 413, "request body too large")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > policy.max_body_bytes:
                    raise BodyTooLarge()
            return message

        async def secured_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        try:
            await self.app(scope, limited_receive, secured_send)
        except BodyTooLarge:
            if not started:
                await self._respond(send, 413, "request body too large")

    async def _refuse(self, scope, receive, send, status: int, reason: str):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        await self._respond(send, status, reason)

    async def _respond(self, send, status: int, reason: str):
        body = json.dumps({"error": reason}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def _set_cookie(self, send):
        """`/?token=T` (already checked): remember it in a strict, HttpOnly cookie and drop it from the URL."""
        cookie = f"{TOKEN_COOKIE}={self.policy.auth_token}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0")] + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": b""})


# Paths ------------------------------------------------------------------------------------------------------

# File-system limits (Linux: NAME_MAX 255 bytes per component, PATH_MAX 4096), checked before any call that
# would fail with ENAMETOOLONG; the joined path also stays well below PATH_MAX once under the server's folders.
MAX_NAME_BYTES = 255
MAX_RELATIVE_PATH_BYTES = 1024


def _byte_length(text: str) -> int:
    """UTF-8 length; text that has no UTF-8 form (a lone surrogate) cannot name a file -> 400."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise HTTPException(400, f"invalid file name or path (not valid text): {text[:100]!r}") from None


def check_name(name: str, what: str = "filename") -> str:
    """A single file name from a client: no separators, no '..', no NUL, not empty, not too long."""
    if not name or "\x00" in name or name in (".", "..") or "/" in name or "\\" in name:
        raise HTTPException(400, f"invalid {what}: {name[:100]!r}")
    size = _byte_length(name)
    if size > MAX_NAME_BYTES:
        raise HTTPException(400, f"{what} too long: {size} bytes, at most {MAX_NAME_BYTES}")
    return name


def check_relative_path(parts: list[str]) -> None:
    """Length limits of a client-named relative path (e.g. subfolder + file name) -> 400."""
    if sum(_byte_length(part) + 1 for part in parts) > MAX_RELATIVE_PATH_BYTES:
        raise HTTPException(400, f"path too long: at most {MAX_RELATIVE_PATH_BYTES} bytes")
    for part in parts:
        for component in part.split("/"):
            size = _byte_length(component)
            if size > MAX_NAME_BYTES:
                raise HTTPException(400, f"path component too long: {size} bytes, at most {MAX_NAME_BYTES}")


def confine(base: str | os.PathLike, *parts: str, status: int = 403) -> Path:
    """`base/parts...` resolved through symlinks; refused unless it stays inside the real `base`. Absolute parts,
    '..' and symlinks that lead outside all end up outside, so one check covers them. Over-long names are a 400
    (whatever `status`), refused before the file system sees them."""
    root = Path(os.path.realpath(base))
    # Backslashes count as separators, as on Windows, so '..\\x' is '../x'.
    relative = [p.replace("\\", "/") for p in parts if p]
    for part in relative:
        if "\x00" in part or os.path.isabs(part) or part.startswith(("/", "\\")) or ".." in Path(part).parts:
            raise HTTPException(status, "path outside the allowed folder")
    check_relative_path(relative)
    target = Path(os.path.realpath(root.joinpath(*relative))) if relative else root
    if target != root and not target.is_relative_to(root):
        raise HTTPException(status, "path outside the allowed folder")
    return target
