"""A minimal stand-in for `aiohttp.web`, importable as `aiohttp` / `aiohttp.web` only when aiohttp itself is
not installed: what pack routes use to declare and answer requests (RouteTableDef, Response, json_response,
FileResponse, the common HTTP exceptions). The server layer serves the recorded routes and converts these
responses. With aiohttp installed, packs get the real module and the server converts its responses the same way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Handler = Callable[..., Any]


@dataclass(frozen=True)
class RouteDef:
    method: str
    path: str
    handler: Handler
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StaticDef:
    prefix: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class RouteTableDef:
    """Records routes declared with decorators (`@routes.get("/x")`)."""

    def __init__(self) -> None:
        self._items: list[RouteDef | StaticDef] = []

    def route(self, method: str, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self._items.append(RouteDef(method.upper(), path, handler, kwargs))
            return handler
        return register

    def get(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self.route("HEAD", path, **kwargs)

    def static(self, prefix: str, path: str, **kwargs: Any) -> None:
        self._items.append(StaticDef(prefix, str(path), kwargs))

    def __iter__(self) -> Iterator[RouteDef | StaticDef]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


class Request:
    """The type pack handlers annotate; the server hands them an object with aiohttp's request API."""


class Response:
    def __init__(self, *, body: bytes | str | None = None, status: int = 200, reason: str | None = None,
                 text: str | None = None, headers: dict[str, str] | None = None, content_type: str | None = None,
                 charset: str | None = None):
        if text is not None:
            body = text
            content_type = content_type or "text/plain"
        if isinstance(body, str):
            body = body.encode(charset or "utf-8")
        self.body: bytes = body or b""
        self.status = status
        self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})
        self.content_type = content_type or self.headers.get("Content-Type") or "application/octet-stream"

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class FileResponse(Response):
    def __init__(self, path: Any, chunk_size: int = 256 * 1024, status: int = 200, reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status=status, reason=reason, headers=headers)
        self._path = str(path)


def json_response(data: Any = None, *, text: str | None = None, body: bytes | None = None, status: int = 200,
                  reason: str | None = None, headers: dict[str, str] | None = None,
                  content_type: str = "application/json", dumps: Callable[[Any], str] = json.dumps) -> Response:
    if body is None and text is None:
        text = dumps(data)
    return Response(body=body if body is not None else text, status=status, reason=reason, headers=headers,
                    content_type=content_type)


class HTTPException(Response, Exception):  # noqa: N818 (aiohttp's name)
    status_code = 500

    def __init__(self, *, headers: dict[str, str] | None = None, reason: str | None = None,
                 text: str | None = None, content_type: str | None = None):
        Response.__init__(self, status=self.status_code, reason=reason, text=text or reason or "",
                          headers=headers, content_type=content_type)
        Exception.__init__(self, reason or self.__class__.__name__)


class HTTPBadRequest(HTTPException):
    status_code = 400


class HTTPUnauthorized(HTTPException):
    status_code = 401


class HTTPForbidden(HTTPException):
    status_code = 403


class HTTPNotFound(HTTPException):
    status_code = 404


class HTTPInternalServerError(HTTPException):
    status_code = 500


class HTTPFound(HTTPException):
    status_code = 302

    def __init__(self, location: str, **kwargs: Any):
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Location"] = str(location)
        super().__init__(headers=headers, **kwargs)


# `from aiohttp import web` and `import aiohttp.web` both give this module.
def route(method: str, path: str, handler: Handler, **kwargs: Any) -> RouteDef:
    """A route definition for `app.add_routes([...])`."""
    return RouteDef(method.upper(), path, handler, kwargs)


def get(path: str, handler: Handler, **kwargs: Any) -> RouteDef:
    return route("GET", path, handler, **kwargs)


def post(path: str, handler: Handler, **kwargs: Any) -> RouteDef:
    return route("POST", path, handler, **kwargs)


def static(prefix: str, path: str, **kwargs: Any) -> StaticDef:
    return StaticDef(prefix, str(path), kwargs)


web = sys.modules[__name__]
