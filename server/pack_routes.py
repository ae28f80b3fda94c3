"""Custom node packs on the HTTP server: the routes they declared on `PromptServer.instance.routes` (aiohttp
style) served by our Starlette app, and their `send_sync` / `send_progress_text` sent through the websocket hub.

A pack handler gets an object with aiohttp's request API (match_info, query, rel_url.query, json(), text(),
read(), post(), headers, method, path) and may answer with an aiohttp `web.Response` / `json_response` /
`FileResponse` (the real aiohttp's or the stand-in of nodes/comfy_compat/web_shim.py) or raise one of its HTTP
exceptions. Routes are served at `/X` and `/api/X`, as ComfyUI does, after our own routes (ours win a clash) and
behind the same security middleware as every route.

Web extensions: the files of each pack's WEB_DIRECTORY are served at `/extensions/<pack>/<path>` (confined to
that folder, symlinks included), and `extension_urls` lists their .js files for `GET /extensions`, which the
frontend imports one by one at boot.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from latentloom.nodes.comfy_compat.prompt_server import PackServer
from latentloom.nodes.comfy_compat.web_shim import RouteDef

from .security import confine
from .ws import Hub

log = logging.getLogger("latentloom.server")
TEXT_FRAME = 3  # ComfyUI's binary event type for progress text
# /extensions/<name>/ folders that are not packs': the frontend's own scripts and our extension module.
RESERVED_EXTENSION_NAMES = frozenset({"core", "latentloom"})


class Query:
    """aiohttp's MultiDict view of a query string."""

    def __init__(self, params: Any):
        self._params = params

    def get(self, key: str, default: Any = None) -> Any:
        return self._params.get(key, default)

    def getone(self, key: str, default: Any = None) -> Any:
        return self._params.get(key, default)

    def getall(self, key: str, default: Any = None) -> list[Any]:
        values = self._params.getlist(key)
        return values if values else ([] if default is None else default)

    def __getitem__(self, key: str) -> Any:
        return self._params[key]

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def __iter__(self) -> Any:
        return iter(self._params)

    def keys(self) -> Any:
        return self._params.keys()

    def items(self) -> Any:
        return self._params.multi_items()


class PackRequest:
    """A Starlette request with aiohttp's request API."""

    def __init__(self, request: Request):
        self._request = request
        self.match_info = dict(request.path_params)
        self.query = Query(request.query_params)
        self.rel_url = SimpleNamespace(query=self.query, path=request.url.path, query_string=request.url.query)
        self.url = request.url
        self.method = request.method
        self.path = request.url.path
        self.headers = request.headers
        self.cookies = request.cookies
        self.content_type = request.headers.get("content-type", "").split(";")[0].strip()
        self.can_read_body = self.body_exists = request.method not in ("GET", "HEAD")

    async def read(self) -> bytes:
        return await self._request.body()

    async def text(self) -> str:
        return (await self._request.body()).decode("utf-8", errors="replace")

    async def json(self, *, loads: Callable[[str], Any] = json.loads) -> Any:
        return loads(await self.text())

    async def post(self) -> Any:
        return await self._request.form()


def starlette_response(result: Any) -> Response:
    """An aiohttp-style response (real or stand-in) as a Starlette one."""
    if isinstance(result, Response):
        return result
    if isinstance(result, (dict, list)):
        return JSONResponse(result)
    status = int(getattr(result, "status", 200))
    headers = {k: v for k, v in dict(getattr(result, "headers", None) or {}).items()
               if k.lower() not in ("content-length", "content-type")}
    path = getattr(result, "_path", None)
    if path is not None:
        return FileResponse(str(path), status_code=status, headers=headers)
    body = getattr(result, "body", None)
    if body is not None and not isinstance(body, (bytes, bytearray, str)):
        body = getattr(body, "_value", b"")  # an aiohttp payload wrapping the bytes
    if isinstance(body, str):
        body = body.encode("utf-8")
    media_type = getattr(result, "content_type", None) or "application/octet-stream"
    return Response(bytes(body or b""), status_code=status, headers=headers, media_type=media_type)


def _starlette_path(path: str) -> str:
    """aiohttp's `{name:regex}` placeholders as Starlette's: a catch-all regex becomes `:path`, others plain."""
    def convert(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        return f"{{{name}:path}}" if pattern in (".*", ".+", "[^{}]+/.*") else f"{{{name}}}"
    return re.sub(r"\{(\w+):([^}]*)\}", convert, path)


def _endpoint(route: RouteDef) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            result = route.handler(PackRequest(request))
            if hasattr(result, "__await__"):
                result = await result
        except Exception as exc:
            if hasattr(exc, "status") and (hasattr(exc, "body") or hasattr(exc, "text")):
                return starlette_response(exc)  # aiohttp's HTTP exceptions are responses
            raise
        return starlette_response(result)
    return endpoint


def pack_routes(engine: Any) -> list[BaseRoute]:
    """Starlette routes for the routes packs declared on this engine's PromptServer."""
    server = engine.env.find_service(PackServer)
    if server is None:
        return []
    routes: list[BaseRoute] = []
    for item in server.routes:
        if not isinstance(item, RouteDef):
            log.warning("custom node route %s (static files) is not served", item)
            continue
        path = _starlette_path(item.path)
        if not path.startswith("/"):
            continue
        endpoint = _endpoint(item)
        methods = ["GET", "HEAD"] if item.method == "GET" else [item.method]
        routes.append(Route(path, endpoint, methods=methods))
        routes.append(Route("/api" + path, endpoint, methods=methods))
    return routes


def web_directories(engine: Any) -> dict[str, Path]:
    """Pack name -> WEB_DIRECTORY folder, for the packs this engine loaded (reserved names left out)."""
    server = engine.env.find_service(PackServer)
    if server is None:
        return {}
    return {name: folder for name, folder in sorted(server.web_directories.items())
            if name not in RESERVED_EXTENSION_NAMES}


def extension_urls(engine: Any) -> list[str]:
    """The URL of every .js file under the packs' web folders, as ComfyUI's GET /extensions lists them."""
    urls: list[str] = []
    for name, folder in web_directories(engine).items():
        for path in sorted(folder.rglob("*.js")):
            if path.is_file():
                urls.append(f"/extensions/{urllib.parse.quote(name)}/{path.relative_to(folder).as_posix()}")
    return urls


def _web_file_endpoint(folder: Path) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        target = confine(folder, request.path_params["path"], status=403)
        if not target.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix in (".js", ".mjs"):
            media_type = "text/javascript"  # module scripts need a JavaScript type whatever the OS tables say
        return FileResponse(str(target), media_type=media_type, headers={"Cache-Control": "no-cache"})
    return endpoint


def web_extension_routes(engine: Any) -> list[BaseRoute]:
    """One route per pack with a web folder: `/extensions/<pack>/<path>` (no /api alias, as ComfyUI)."""
    for name in sorted(set((engine.env.find_service(PackServer) or PackServer()).web_directories)
                       & RESERVED_EXTENSION_NAMES):
        log.warning("custom node pack %s: its web folder is not served (/extensions/%s/ is reserved)", name, name)
    return [Route(f"/extensions/{name}/{{path:path}}", _web_file_endpoint(folder), methods=["GET", "HEAD"])
            for name, folder in web_directories(engine).items()]


def connect_pack_server(engine: Any, hub: Hub) -> None:
    """Send packs' `send_sync` messages and progress texts through the hub (thread-safe: they come from the
    worker thread)."""
    server = engine.env.find_service(PackServer)
    if server is None:
        return

    def send_text(node_id: str, text: str, client_id: str | None) -> None:
        encoded = node_id.encode("utf-8")
        frame = struct.pack(">II", TEXT_FRAME, len(encoded)) + encoded + text.encode("utf-8")

        def deliver() -> None:  # runs on the hub's loop
            targets = [hub.clients.get(client_id)] if client_id is not None else list(hub.clients.values())
            for client in targets:
                if client is not None:
                    client.push(frame)
        hub._post(deliver)

    server.json_sender = hub.post_json
    server.text_sender = send_text
