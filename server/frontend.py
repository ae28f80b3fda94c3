"""The ComfyUI web frontend (the `comfyui-frontend-package` wheel) served at `/`, plus the small routes it reads at
boot: /extensions (JS modules to import: none), /i18n (no extra translations) and /templates/* (the bundled
template index: empty; our graphs/ come through /workflow_templates instead)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}


def frontend_root() -> Path | None:
    """The package's static/ folder, found through the installed package (None when it is not installed)."""
    try:
        root = importlib.resources.files("comfyui_frontend_package") / "static"
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "index.html").is_file() else None


async def extensions(request: Request):
    return JSONResponse([])


async def i18n(request: Request):
    return JSONResponse({})


async def templates(request: Request):
    name = request.path_params["name"]
    if name.startswith("index") and name.endswith(".json"):
        return JSONResponse([])
    return Response(status_code=404)


class FrontendFiles(StaticFiles):
    """Static files with ComfyUI's cache policy: scripts and styles revalidate, the index never caches."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        if path in ("", ".", "index.html") or path.endswith((".js", ".css", ".json")):
            response.headers.update(NO_CACHE if path in ("", ".", "index.html") else {"Cache-Control": "no-cache"})
        return response


async def user_css(request: Request):
    # index.html links an optional user stylesheet; an empty one keeps the console free of MIME errors.
    return Response("", media_type="text/css")


def api_routes() -> list:
    return [Route("/extensions", extensions, methods=["GET"]), Route("/i18n", i18n, methods=["GET"])]


def static_routes(root: Path | None) -> list:
    routes: list = [Route("/templates/{name:path}", templates, methods=["GET"]),
                    Route("/user.css", user_css, methods=["GET"])]
    if root is None:
        async def missing(request: Request):
            return Response("comfyui-frontend-package is not installed: the API works, the editor is missing.\n",
                            media_type="text/plain", status_code=404)
        routes.append(Route("/", missing, methods=["GET"]))
        return routes
    index = Path(root) / "index.html"

    async def home(request: Request):
        return FileResponse(index, headers=NO_CACHE)

    routes.append(Route("/", home, methods=["GET"]))
    routes.append(Mount("/", app=FrontendFiles(directory=str(root), html=False), name="frontend"))
    return routes
